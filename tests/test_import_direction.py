"""Packages point one way: the daemon package never reaches the trainer.

``bwpredd`` (daemon, client, ``bwpredctl``, check-model, ``Predictor``) runs
on every node without torch, onnx or the ``trainer``/``export`` packages;
those may import ``bwpredd``'s contracts, never the reverse. Three checks:
every module of ``bwpredd``, imported in a fresh interpreter, leaves none of
them in ``sys.modules``; no module of ``bwpredd`` names them in an import
statement anywhere (a lazy import inside a function, which importing the
module would miss); and ``bwpredctl replay``, the command that reads traces
as the trainer does, runs against a real daemon without loading them.
Project modules are imported plainly, never by string, in ``bwpredd``,
``trainer`` and ``export`` alike, so the type checker and the linter see
every edge.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bwpredd
from tests.helpers import running_server

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages a deployed node must not load. onnxruntime is allowed
# (and is not "onnx": names are matched whole, or up to a dot).
FORBIDDEN = ("torch", "onnx", "trainer", "export")
# Not imported: ``bwpredd.__main__`` runs the daemon when imported (it only
# calls bwpredd.cli, which is imported); ``bwpredd.bench`` and
# ``bwpredd._bench_floor`` are offline tools leaving the package for a
# top-level folder of their own.
EXCLUDED = ("bwpredd.__main__", "bwpredd.bench", "bwpredd._bench_floor")

_CHILD = """
import json, pkgutil, sys
import bwpredd

forbidden = tuple(sys.argv[1].split(","))
excluded = set(sys.argv[2].split(","))

def loaded():
    return sorted(m for m in sys.modules if m.split(".")[0] in forbidden)

names = [m.name for m in pkgutil.walk_packages(bwpredd.__path__, "bwpredd.")]
found = {}
for name in sorted(names):
    if name in excluded:
        continue
    before = set(loaded())
    __import__(name)
    new = {m.split(".")[0] for m in loaded() if m not in before}
    if new:
        found[name] = sorted(new)
print(json.dumps({"modules": sorted(n for n in names if n not in excluded), "found": found}))
"""


def _modules() -> list[tuple[str, Path]]:
    """Every module of ``bwpredd`` but the excluded ones, with its file."""
    out = []
    for info in pkgutil.walk_packages(bwpredd.__path__, "bwpredd."):
        if info.name in EXCLUDED:
            continue
        spec = info.module_finder.find_spec(info.name, None)
        assert spec is not None and spec.origin is not None, info.name
        out.append((info.name, Path(spec.origin)))
    return out


def _forbidden(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] in FORBIDDEN


class TestDaemonPackage:
    """What importing the daemon package loads."""

    def test_importing_every_module_loads_no_trainer_torch_or_onnx(self) -> None:
        """Each bwpredd module, imported in a fresh interpreter, loads none of
        torch, onnx, trainer or export (the test names the module that did)."""
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, ",".join(FORBIDDEN), ",".join(EXCLUDED)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=240,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        # The walk really covered the package (a broken walk would find nothing).
        assert {"bwpredd.server", "bwpredd.ctl", "bwpredd.replay", "bwpredd.traces"} <= set(
            result["modules"]
        )
        assert result["found"] == {}, "\n".join(
            f"importing {mod} loaded {', '.join(new)}" for mod, new in result["found"].items()
        )

    def test_no_module_names_trainer_torch_or_onnx_in_an_import(self) -> None:
        """No import statement in bwpredd, at module level or inside a
        function, names torch, onnx, trainer or export."""
        bad = []
        for name, path in _modules():
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    targets = [node.module]
                else:
                    continue
                bad += [f"{name}:{node.lineno} imports {t}" for t in targets if _forbidden(t)]
        assert bad == [], "\n".join(bad)


_REPLAY_CHILD = """
import json, sys
from bwpredd.ctl import main

code = main(sys.argv[2:])
forbidden = tuple(sys.argv[1].split(","))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
print(json.dumps({"code": code, "loaded": loaded}))
"""


class TestReplayCommand:
    """``bwpredctl replay`` reads traces with the daemon package alone."""

    def test_replay_loads_no_trainer(self, tmp_path: Path) -> None:
        """``bwpredctl replay`` of a generic CSV trace, run against a real
        daemon in a fresh interpreter, scores it without loading torch, onnx,
        trainer or export."""
        trace = tmp_path / "link.csv"
        rows = [f"{t},{5.0 + (t % 3)},20,0,1" for t in range(12)]
        header = "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability"
        trace.write_text(header + "\n" + "\n".join(rows) + "\n")
        with running_server(tmp_path) as (server, _):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _REPLAY_CHILD,
                    ",".join(FORBIDDEN),
                    "--target",
                    server.address,
                    "--json",
                    "replay",
                    "--no-progress",
                    str(trace),
                ],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=120,
                check=False,
            )
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        report, result = json.loads(lines[-2]), json.loads(lines[-1])
        assert result["code"] == 0
        assert report["files"][0]["samples"] == 12
        assert result["loaded"] == [], f"bwpredctl replay loaded {result['loaded']}"


def _string_imports(path: Path) -> list[int]:
    """Lines of ``path`` that import a module by string: ``importlib.import_module``,
    ``__import__`` or ``importlib.util`` loaders."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "spec_from_file_location"):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("package", ["bwpredd", "trainer", "export"])
def test_project_modules_are_imported_plainly(package: str) -> None:
    """No module of bwpredd, trainer or export imports a module by string."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if "/_proto/" in rel or rel.removesuffix(".py").replace("/", ".") in EXCLUDED:
            continue
        bad += [f"{rel}:{line}" for line in _string_imports(path)]
    assert bad == [], "imports by string: " + ", ".join(bad)
