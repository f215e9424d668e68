"""deploy/install.sh run as root with a umask of 077, staged into a DESTDIR.

Root's umask is often 077. Under it the installer used to make a venv the
service's (dynamic, unprivileged) user could not read, and systemd failed
with 203/EXEC. One real install (venv, pip, the daemon's dependencies, no
torch) is staged once for the module; the tests read its modes and run the
staged daemon's code as an unprivileged user.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534


def _system_python_problem() -> str | None:
    """Why the system Python cannot make the venv, or None."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"{SYSTEM_PYTHON} is missing"
    check = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    if subprocess.run([SYSTEM_PYTHON, "-c", check], check=False).returncode != 0:
        return f"{SYSTEM_PYTHON} is older than 3.11 or lacks venv/ensurepip (python3-venv)"
    return None


def run_install(destdir: Path, calls: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``sh deploy/install.sh`` under ``umask 077`` with DESTDIR; systemctl
    and groupadd are stand-ins that record a call (a staged install makes
    neither)."""
    bin_dir = calls.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("systemctl", "groupadd", "useradd"):
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\n')
        stub.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith(("BWPREDD_", "VIRTUAL_ENV"))}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", DESTDIR=str(destdir), **env)
    return subprocess.run(
        ["sh", "-c", 'umask 077 && exec sh "$0"', str(INSTALL)],
        check=False,
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
    )


def loose_modes(top: Path) -> list[str]:
    """Paths under ``top`` that a user outside root's group cannot read
    (directories: enter and list), or that others may write."""
    bad = []
    for path in [top, *top.rglob("*")]:
        st = path.lstat()
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            continue
        need = 0o005 if stat.S_ISDIR(st.st_mode) else 0o004
        if mode & need != need or mode & 0o022:
            bad.append(f"{mode:04o} {path.relative_to(top)}")
    return bad


@pytest.fixture(scope="module")
def staged() -> Iterator[Path]:
    """A real install under umask 077 into a DESTDIR; yields the DESTDIR."""
    if os.geteuid() != 0:
        pytest.skip("the installer is run as root")
    problem = _system_python_problem()
    if problem:
        pytest.skip(problem)
    # Not under pytest's 0700 tmp: the unprivileged run below must reach it.
    base = Path(tempfile.mkdtemp(prefix="bwpredd-install-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        calls = base / "calls"
        proc = run_install(base / "root", calls, PYTHON=SYSTEM_PYTHON)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert not calls.exists(), calls.read_text()
        yield base / "root"
    finally:
        shutil.rmtree(base)


class TestInstallUnderUmask077:
    """What a root with umask 077 gets from install.sh."""

    def test_every_file_readable_by_the_service(self, staged: Path) -> None:
        """Every directory the installer made can be entered and listed by
        others, every file read, and nothing is writable but by root: unit,
        config and the whole venv."""
        assert (staged / "opt/bwpredd/venv/bin/bwpredd").exists()
        assert (staged / "etc/systemd/system/bwpredd.service").exists()
        assert (staged / "etc/bwpredd/bwpredd.toml").exists()
        assert loose_modes(staged) == []

    def test_an_unprivileged_user_loads_the_model(self, staged: Path) -> None:
        """As uid/gid 65534 with no groups (what 203/EXEC lacked), the staged
        venv runs bwpredd, imports onnxruntime and loads the embedded model."""
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is not installed")
        venv = staged / "opt/bwpredd/venv"
        code = (
            "from bwpredd.modeldir import DEFAULT_MODEL_DIR as d, load_model; "
            "print(load_model(d).version)"
        )
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "ORT_DISABLE_TELEMETRY": "1"}
        help_ = subprocess.run(
            [*as_nobody, str(venv / "bin/bwpredd"), "--help"],
            check=False, capture_output=True, text=True, env=env, timeout=120, cwd="/",
        )  # fmt: skip
        assert help_.returncode == 0, help_.stderr
        load = subprocess.run(
            [*as_nobody, str(venv / "bin/python"), "-c", code],
            check=False, capture_output=True, text=True, env=env, timeout=120, cwd="/",
        )  # fmt: skip
        assert load.returncode == 0, load.stderr
        assert load.stdout.strip()  # the model's version, read from the venv (cwd is /)

    def test_no_torch(self, staged: Path) -> None:
        """The daemon's venv holds its dependencies and not torch or onnx,
        nor the offline tools (bench/) or the tests."""
        (site,) = (staged / "opt/bwpredd/venv/lib").glob("python3.*/site-packages")
        assert (site / "onnxruntime").is_dir() and (site / "bwpredd").is_dir()
        assert not (site / "torch").exists() and not (site / "onnx").exists()
        assert not (site / "bench").exists() and not (site / "tests").exists()

    def test_rerun_repairs_a_venv_made_under_077(self, staged: Path) -> None:
        """A venv left 0700/0600 by an earlier install is opened to the
        service by the next run (pip alone keeps the old modes)."""
        venv = staged / "opt/bwpredd/venv"
        (site,) = (venv / "lib").glob("python3.*/site-packages")
        for path in (venv, site, site / "numpy"):
            path.chmod(0o700)
        (site / "numpy/__init__.py").chmod(0o600)
        proc = run_install(staged, staged.parent / "calls", PYTHON=SYSTEM_PYTHON)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "made " in proc.stdout and "readable by the service" in proc.stdout
        assert loose_modes(staged) == []


class TestInstallRefusals:
    """What the installer will not change."""

    def test_unreachable_prefix_parent_refused(self, tmp_path: Path) -> None:
        """An existing directory above the venv that others cannot enter is
        named and left as it was, before any venv is made."""
        if os.geteuid() != 0:
            pytest.skip("the installer is run as root")
        problem = _system_python_problem()
        if problem:
            pytest.skip(problem)
        destdir = tmp_path / "root"
        (destdir / "srv/private").mkdir(parents=True)
        (destdir / "srv/private").chmod(0o700)
        proc = run_install(
            destdir, tmp_path / "calls", PYTHON=SYSTEM_PYTHON, PREFIX="/srv/private/bwpredd"
        )
        assert proc.returncode != 0
        assert "/srv/private has mode 700" in proc.stderr
        assert stat.S_IMODE((destdir / "srv/private").stat().st_mode) == 0o700
        assert not (destdir / "srv/private/bwpredd").exists()

    def test_staged_files_under_umask_077(self, tmp_path: Path) -> None:
        """Without the venv step, the unit, the config and the directories
        made for them are 0644/0755 under umask 077."""
        proc = run_install(tmp_path / "root", tmp_path / "calls", BWPREDD_INSTALL_SKIP_VENV="1")
        assert proc.returncode == 0, proc.stderr
        assert loose_modes(tmp_path / "root") == []
        unit = tmp_path / "root/etc/systemd/system/bwpredd.service"
        assert stat.S_IMODE(unit.stat().st_mode) == 0o644

    def test_unreadable_kept_config_named(self, tmp_path: Path) -> None:
        """A config directory or file kept from an install made under umask
        077 is left as it is, and the installer fails naming it."""
        conf = tmp_path / "root/etc/bwpredd"
        conf.mkdir(parents=True)
        (conf / "bwpredd.toml").write_text('log_level = "debug"\n')
        (conf / "bwpredd.toml").chmod(0o600)
        conf.chmod(0o700)
        env = {"BWPREDD_INSTALL_SKIP_VENV": "1"}
        proc = run_install(tmp_path / "root", tmp_path / "calls", **env)
        assert proc.returncode != 0 and "/etc/bwpredd has mode 700" in proc.stderr
        assert stat.S_IMODE(conf.stat().st_mode) == 0o700
        conf.chmod(0o755)
        proc = run_install(tmp_path / "root", tmp_path / "calls", **env)
        assert proc.returncode != 0 and "/etc/bwpredd/bwpredd.toml has mode 600" in proc.stderr
        assert (conf / "bwpredd.toml").read_text() == 'log_level = "debug"\n'
