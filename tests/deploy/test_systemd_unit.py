"""deploy/bwpredd.service and deploy/install.sh.

``systemd-analyze verify`` needs the ExecStart binary to exist, so the verify
test copies the unit into a temporary directory with ExecStart pointing at
this venv's ``bwpredd``; everything else is checked on the file as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bwpredd.config import Config

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "bwpredd.service"
INSTALL = ROOT / "deploy" / "install.sh"
SHIPPED_EXEC = "/opt/bwpredd/venv/bin/bwpredd"
VENV_BWPREDD = Path(sys.executable).parent / "bwpredd"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def directives(path: Path = UNIT) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, every value of a repeated key in order."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


def one(key: str) -> str:
    (value,) = directives()[key]
    return value


def seconds(span: str) -> float:
    """A systemd time span such as ``30s``, ``1min 30s`` or ``90``."""
    units = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "": 1.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span):
        total += float(number) * units[unit]
    return total


class TestUnitFile:
    """What the unit promises, read from the file."""

    def test_notify_service(self) -> None:
        """Type=notify with only the main process allowed to notify, reload by
        SIGHUP, restart on failure but not on a config or start-up error."""
        assert one("Type") == "notify"
        assert one("NotifyAccess") == "main"
        assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
        assert one("Restart") == "on-failure"
        assert set(one("RestartPreventExitStatus").split()) == {"2", "3", "203"}

    def test_a_failing_start_does_not_loop(self) -> None:
        """A start that fails fast (2xx set-up errors other than 203, a crash)
        hits the start limit: StartLimitBurst restarts, RestartSec apart,
        fit inside StartLimitIntervalSec, so the unit ends up failed."""
        burst = int(one("StartLimitBurst"))
        assert 1 <= burst <= 10
        assert burst * seconds(one("RestartSec")) < seconds(one("StartLimitIntervalSec"))

    def test_proc_not_subset(self) -> None:
        """ProcSubset=pid is off: it hides /proc/cpuinfo from onnxruntime's
        CPU detection (non-JSON journal lines at every start)."""
        assert "ProcSubset" not in directives()
        assert one("ProtectProc") == "invisible"

    def test_exec_start_reads_the_installed_config(self) -> None:
        """ExecStart runs the venv install.sh makes with the config it installs."""
        assert one("ExecStart") == f"{SHIPPED_EXEC} --config /etc/bwpredd/bwpredd.toml"
        text = INSTALL.read_text()
        assert "PREFIX:-/opt/bwpredd}" in text and "$CONF_DIR/bwpredd.toml" in text

    def test_timeouts(self) -> None:
        """The watchdog is on, and the stop timeout leaves the grace period
        plus time to write the snapshot."""
        assert seconds(one("WatchdogSec")) >= 5
        assert seconds(one("TimeoutStopSec")) >= Config.grace_period_s + 5

    def test_directories(self) -> None:
        """systemd makes the socket, state and config directories; the socket's
        is 0750 so only the service and its group can enter."""
        assert one("RuntimeDirectory") == "bwpredd"
        assert one("RuntimeDirectoryMode") == "0750"
        assert one("StateDirectory") == "bwpredd"
        assert one("ConfigurationDirectory") == "bwpredd"

    def test_socket_group_matches_install(self) -> None:
        """A dynamic user with the static group install.sh creates, so the
        group's members reach the 0660 socket."""
        assert one("DynamicUser") == "yes"
        group = one("Group")
        assert re.search(rf"^GROUP={group}$", INSTALL.read_text(), re.M)
        assert "SupplementaryGroups" not in directives()

    def test_hardening_choices(self) -> None:
        """W^X memory is denied, no capabilities, no dialling out, and
        onnxruntime's telemetry is off."""
        d = directives()
        assert d["MemoryDenyWriteExecute"] == ["yes"]
        assert d["CapabilityBoundingSet"] == [""]
        assert d["IPAddressDeny"] == ["any"]
        env = " ".join(d["Environment"]).split()
        assert "ORT_DISABLE_TELEMETRY=1" in env


@needs_analyze
class TestSystemdAnalyze:
    """systemd's own checks of the unit."""

    def test_verify_is_clean(self, tmp_path: Path) -> None:
        """systemd-analyze verify prints nothing and exits 0 (ExecStart
        pointed at this venv's bwpredd so the binary exists)."""
        assert VENV_BWPREDD.exists()
        unit = tmp_path / "bwpredd.service"
        text = UNIT.read_text()
        assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
        unit.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={VENV_BWPREDD} "))
        proc = subprocess.run(
            ["systemd-analyze", "verify", str(unit)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "" and proc.stderr.strip() == ""

    def test_exposure_at_most_2(self) -> None:
        """systemd-analyze security --offline=yes rates the unit 2.0 or less."""
        proc = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if "--offline" in proc.stderr and proc.returncode != 0:
            pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
        m = re.search(r"Overall exposure level for bwpredd\.service: (\d+\.\d+)", proc.stdout)
        assert m, proc.stdout + proc.stderr
        assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


def _expand(group: str, seen: set[str] | None = None) -> set[str]:
    """System calls of a systemd syscall group, nested groups expanded."""
    seen = set() if seen is None else seen
    if group in seen:
        return set()
    seen.add(group)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group], capture_output=True, text=True, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _expand(item, seen) if item.startswith("@") else {item}
    return calls


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines applied in order, as systemd does:
    the first (an allow list) sets the set, ``~`` lines remove, others add."""
    allowed: set[str] = set()
    for value in directives()["SystemCallFilter"]:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


SYSCALL = re.compile(r"^\d+\s+([a-z0-9_]+)\((.*)$")


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, str]]:
    """(syscall, arguments) of a daemon traced through start-up, traffic,
    a SIGHUP reload and SIGTERM, with the unit's environment."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    from tests.helpers import sample, spawn_daemon, wait_for_health

    tmp = tmp_path_factory.mktemp("strace")
    trace = tmp / "trace.txt"
    sock = f"unix:{tmp}/run/bwpredd.sock"
    env: dict[str, str] = {}
    for item in " ".join(directives()["Environment"]).split():
        key, _, value = item.partition("=")
        env[key] = value
    # STATE_DIRECTORY as systemd sets it (StateDirectory=): snapshots and
    # recordings are written, so their system calls are traced too.
    env.update(
        BWPREDD_LISTEN=sock,
        BWPREDD_METRICS_ADDR="127.0.0.1:0",
        BWPREDD_LOG_FORMAT="json",
        STATE_DIRECTORY=str(tmp / "state"),
    )
    proc = spawn_daemon(env=env, wrap=["strace", "-f", "-qq", "-o", str(trace)])
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(
        target=lambda: lines.extend(raw.decode(errors="replace") for raw in stdout), daemon=True
    ).start()
    try:
        deadline = time.monotonic() + 60
        while not Path(sock.removeprefix("unix:")).exists():
            if proc.poll() is not None:
                time.sleep(0.2)  # let the reader thread take the last lines
                if "Operation not permitted" in "".join(lines):
                    pytest.skip("ptrace is not permitted here")
                pytest.fail(f"traced daemon exited {proc.returncode}: {''.join(lines)}")
            assert time.monotonic() < deadline, "traced daemon did not start"
            time.sleep(0.05)
        client = wait_for_health(sock, timeout=30)
        client.push([sample(f"p{i % 3}", 10.0 + i, latency_ms=1.0) for i in range(30)])
        client.forecast(["p0", "p1", "p2"])
        client.allocate(["p0"])
        client.close()
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        (daemon,) = (int(pid) for pid in children)
        os.kill(daemon, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not any('"model_reloaded"' in line for line in lines):
            assert time.monotonic() < deadline, "no model_reloaded line"
            time.sleep(0.05)
        os.kill(daemon, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close()
    calls = []
    for line in trace.read_text().splitlines():
        m = SYSCALL.match(line)
        if m:
            calls.append((m.group(1), m.group(2)))
    return calls


class TestDaemonUnderTheSandbox:
    """The daemon's own system calls, traced, against what the unit allows."""

    def test_no_write_execute_memory(self, traced: list[tuple[str, str]]) -> None:
        """No mmap asks for writable+executable memory and no mprotect adds
        PROT_EXEC, so MemoryDenyWriteExecute=yes keeps onnxruntime working."""
        assert any(c == "mmap" and "PROT_EXEC" in a for c, a in traced), "trace saw no libraries"
        bad = [
            f"{c}({a}"
            for c, a in traced
            if (c == "mmap" and "PROT_WRITE" in a and "PROT_EXEC" in a)
            or (c in ("mprotect", "pkey_mprotect") and "PROT_EXEC" in a)
            or (c == "shmat" and "SHM_EXEC" in a)
        ]
        assert bad == []

    @needs_analyze
    def test_syscalls_within_the_filter(self, traced: list[tuple[str, str]]) -> None:
        """Every system call the daemon made is in the unit's SystemCallFilter=."""
        allowed = allowed_syscalls()
        assert "mount" not in allowed and "read" in allowed
        used = {c for c, _ in traced}
        assert used - allowed == set()

    def test_never_dials_out(self, traced: list[tuple[str, str]]) -> None:
        """No connect() to an IP address: IPAddressDeny=any costs nothing, and
        onnxruntime's telemetry (off by ORT_DISABLE_TELEMETRY=1) stays silent."""
        dials = [a for c, a in traced if c == "connect" and "AF_INET" in a]
        assert dials == []


class TestInstallScript:
    """deploy/install.sh staged under DESTDIR (no venv, no root changes)."""

    def _run(self, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
        # Stand-ins that record a call: a staged install must call neither.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        for tool in ("systemctl", "groupadd", "useradd"):
            stub = bin_dir / tool
            stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
            stub.chmod(0o755)
        full = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "DESTDIR": str(tmp_path / "root"),
            "BWPREDD_INSTALL_SKIP_VENV": "1",
            **env,
        }
        return subprocess.run(
            ["sh", str(INSTALL)], check=False, env=full, capture_output=True, text=True, timeout=60
        )

    def test_files_land(self, tmp_path: Path) -> None:
        """The unit goes to etc/systemd/system and the config to
        etc/bwpredd/bwpredd.toml, both as shipped, mode 0644."""
        proc = self._run(tmp_path)
        assert proc.returncode == 0, proc.stderr
        root = tmp_path / "root"
        unit = root / "etc/systemd/system/bwpredd.service"
        conf = root / "etc/bwpredd/bwpredd.toml"
        assert unit.read_text() == UNIT.read_text()
        assert conf.read_text() == (ROOT / "deploy/bwpredd.toml").read_text()
        assert unit.stat().st_mode & 0o777 == 0o644
        assert not (tmp_path / "calls").exists()

    def test_existing_config_kept(self, tmp_path: Path) -> None:
        """A second install keeps an edited config and says so."""
        assert self._run(tmp_path).returncode == 0
        conf = tmp_path / "root/etc/bwpredd/bwpredd.toml"
        conf.write_text('log_level = "debug"\n')
        proc = self._run(tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert conf.read_text() == 'log_level = "debug"\n'
        assert "kept" in proc.stdout

    def test_prefix_moves_exec_start(self, tmp_path: Path) -> None:
        """PREFIX=/srv/bwpredd points ExecStart at /srv/bwpredd/venv."""
        proc = self._run(tmp_path, PREFIX="/srv/bwpredd")
        assert proc.returncode == 0, proc.stderr
        unit = tmp_path / "root/etc/systemd/system/bwpredd.service"
        (exec_start,) = directives(unit)["ExecStart"]
        assert exec_start == "/srv/bwpredd/venv/bin/bwpredd --config /etc/bwpredd/bwpredd.toml"

    def test_refuses_relative_prefix(self, tmp_path: Path) -> None:
        """A relative PREFIX is refused before anything is written."""
        proc = self._run(tmp_path, PREFIX="opt/bwpredd")
        assert proc.returncode != 0 and "absolute" in proc.stderr
        assert not (tmp_path / "root").exists()
