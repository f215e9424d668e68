"""The policy graph (export.policy): built from a directory's forecaster and
allocator, checked by the export and again by the daemon's loader, optional
in the model directory contract."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bwpredd.engine import Engine
from bwpredd.errors import ModelError
from bwpredd.manifest import load_manifest
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model, synthetic_windows
from export.__main__ import main as export_main
from export.policy import POLICY_FILE


def _without_policy(dest: Path) -> Path:
    """A copy of the embedded default as it was before the policy graph."""
    shutil.copytree(DEFAULT_MODEL_DIR, dest)
    (dest / POLICY_FILE).unlink()
    raw = json.loads((dest / "manifest.json").read_text())
    del raw["policy"]
    raw["parity"].pop("policy", None)
    (dest / "manifest.json").write_text(json.dumps(raw))
    return dest


def _rewrite_policy(d: Path, graph: onnx.ModelProto) -> None:
    """Replace d's policy graph, its sha256 updated so only the graph differs."""
    data = graph.SerializeToString()
    (d / POLICY_FILE).write_bytes(data)
    raw = json.loads((d / "manifest.json").read_text())
    raw["policy"]["sha256"] = hashlib.sha256(data).hexdigest()
    (d / "manifest.json").write_text(json.dumps(raw))


def test_shipped_default_uses_its_policy_graph() -> None:
    model = load_model(DEFAULT_MODEL_DIR)
    assert model.manifest.policy is not None
    assert model.policy is not None and model.policy_note == "in use"


def test_add_policy_to_an_old_directory(tmp_path: Path) -> None:
    """``python -m export --add-policy-to DIR`` adds the graph, keeps every
    other graph byte for byte and the version, and the result serves the
    two-graph answers in one run."""
    old = _without_policy(tmp_path / "old")
    before = {p.name: p.read_bytes() for p in old.iterdir() if p.suffix == ".onnx"}
    assert load_model(old).policy is None
    out = tmp_path / "new"
    rc = export_main(["--add-policy-to", str(old), "--out", str(out), "--parity-windows", "128"])
    assert rc == 0
    for name, data in before.items():
        assert (out / name).read_bytes() == data, name
    manifest = load_manifest(out)
    assert manifest.version == load_manifest(old).version
    assert manifest.extra["parity"]["policy"]["max_abs_q_err"] <= 1e-4
    model = load_model(out)
    assert model.policy is not None
    windows = synthetic_windows(256, seed=4)
    counts = np.full(len(windows), windows.shape[1])
    a = Engine(load_model(old)).forecast_allocate(windows, counts, 2.0)
    b = Engine(model).forecast_allocate(windows, counts, 2.0)
    np.testing.assert_array_equal(a.forecasts.point, b.forecasts.point)
    np.testing.assert_array_equal(a.action, b.action)
    # In place (the default without --out), and not with --run.
    assert export_main(["--add-policy-to", str(old), "--parity-windows", "64"]) == 0
    assert load_model(old).policy is not None
    with pytest.raises(SystemExit):
        export_main(["--add-policy-to", str(old), "--run", str(tmp_path)])


def test_a_policy_graph_that_disagrees_is_not_used(tmp_path: Path) -> None:
    """A declared policy graph whose answers differ from the two graphs'
    (here the state's clip narrowed) loads, is not used, and the loader
    says why; the model answers with the two graphs."""
    d = Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m"))
    graph = onnx.load(d / POLICY_FILE)
    clip = [i for i in graph.graph.initializer if i.name.endswith("float32_scalar_50.0")]
    assert clip, "the state's clip bound"
    clip[0].CopyFrom(numpy_helper.from_array(np.float32(0.5), clip[0].name))
    _rewrite_policy(d, graph)
    model = load_model(d)
    assert model.policy is None
    assert model.policy_note.startswith("unused: at step"), model.policy_note
    assert "q_values differ" in model.policy_note or "greedy actions" in model.policy_note


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p["inputs"].reverse(), r"policy\.inputs: expected \['window', 'step_s'\]"),
        (lambda p: p["outputs"].pop(), r"policy\.outputs: expected"),
        (lambda p: p.update(file="forecaster.onnx"), "each graph must have a file of its own"),
    ],
)
def test_bad_policy_entry_refused(tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    """A malformed policy entry is refused with the field named."""
    d = Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m"))
    raw = json.loads((d / "manifest.json").read_text())
    change(raw["policy"])
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match=message):
        load_model(d)


def test_tampered_policy_graph_refused(tmp_path: Path) -> None:
    """The policy graph's sha256 is checked like the others'."""
    d = Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "m"))
    data = bytearray((d / POLICY_FILE).read_bytes())
    data[-1] ^= 1
    (d / POLICY_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"policy\.onnx: sha256 mismatch"):
        load_model(d)
