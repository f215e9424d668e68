"""The horizon graph: export, parity against torch, and adding it to a model
directory.

The horizon forecaster (:mod:`trainer.models.horizon`) becomes a third graph,
``horizon.onnx`` (inputs ``window`` float32[N,10,4] and ``step_s``
float32[N,1]; outputs ``mean_mbps``, ``low_mbps``, ``high_mbps``
float32[N,H]), declared in the manifest with its ``horizons``.
:func:`export_model_dir` ships it with the other two when the run has one;
:func:`add_horizon` adds (or replaces) it in an already published directory,
keeping the other graphs byte for byte, under a new version.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from bwpredd.manifest import (
    HORIZON_INPUTS,
    HORIZON_OUTPUTS,
    Manifest,
    load_manifest,
)
from bwpredd.modeldir import session
from bwpredd.schema import BW, WIDTH, WINDOW
from export.manifest import jsonable, tensor_specs, weights_digest
from export.to_onnx import OPSET
from export.verify import F32, MAX_REL_ERR, ParityError, ParityReport

__all__ = [
    "HORIZON_FILE",
    "PARITY_STEPS_S",
    "add_horizon",
    "export_horizon",
    "horizon_manifest_entry",
    "horizon_parity",
]

HORIZON_FILE = "horizon.onnx"
# Steps the parity check runs at (every window at each): the shortest and
# longest steps of the shipped traces, and the daemon's default.
PARITY_STEPS_S = (0.5, 1.0, 5.0)
_OPT_LEVELS = {"disabled": False, "enabled_all": True}


def export_horizon(model: nn.Module) -> bytes:
    """Export a horizon model to a checked ONNX graph (legacy exporter,
    opset 17, like the other graphs; the batch axis dynamic).

    Args:
        model: maps ``(window [N, WINDOW, WIDTH], step_s [N, 1])`` to three ``[N, H]``
            tensors in Mbit/s.
    """
    window = torch.rand(4, WINDOW, WIDTH)
    window[:, :, BW] *= 100.0
    step = torch.ones(4, 1)
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                model,
                (window, step),
                buf,  # type: ignore[arg-type]  # file objects work; the stub says paths
                dynamo=False,
                opset_version=OPSET,
                input_names=list(HORIZON_INPUTS),
                output_names=list(HORIZON_OUTPUTS),
                dynamic_axes={n: {0: "N"} for n in (*HORIZON_INPUTS, *HORIZON_OUTPUTS)},
                do_constant_folding=True,
            )
    finally:
        model.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "bwpredd-export"
    onnx.checker.check_model(proto, full_check=True)
    data: bytes = proto.SerializeToString()
    return data


def horizon_parity(model: nn.Module, model_bytes: bytes, windows: F32) -> ParityReport:
    """Compare the horizon graph with torch on raw windows at each of
    :data:`PARITY_STEPS_S`, with graph optimisations off and on; the error is
    relative to each value (all are >= the graph's 1 kbit/s floor x e^-shift).

    Raises:
        ParityError: a misshapen output or an error above 1e-4.
    """
    model.eval()
    per_level: dict[str, float] = {}
    max_abs = 0.0
    n = len(windows)
    for level, optimise in _OPT_LEVELS.items():
        sess = session(model_bytes, optimise=optimise)
        rel = 0.0
        for step in PARITY_STEPS_S:
            steps = np.full((n, 1), step, dtype=np.float32)
            with torch.no_grad():
                ref = [
                    t.numpy().astype(np.float64)
                    for t in model(torch.from_numpy(windows), torch.from_numpy(steps))
                ]
            got = sess.run(
                list(HORIZON_OUTPUTS), {HORIZON_INPUTS[0]: windows, HORIZON_INPUTS[1]: steps}
            )
            for name, g, r in zip(HORIZON_OUTPUTS, got, ref, strict=True):
                if g.shape != r.shape or g.dtype != np.float32:
                    raise ParityError(
                        f"horizon {name}: got {g.dtype}{list(g.shape)}, want {list(r.shape)}"
                    )
                err = np.abs(g.astype(np.float64) - r)
                max_abs = max(max_abs, float(err.max()))
                rel = max(rel, float((err / np.maximum(np.abs(r), 1e-9)).max()))
        per_level[level] = rel
    report = ParityReport(max(per_level.values()), max_abs, n * len(PARITY_STEPS_S), per_level)
    if not report.max_rel_err <= MAX_REL_ERR:
        raise ParityError(f"horizon: max relative error {report.max_rel_err:.3g} > 1e-4")
    return report


def horizon_manifest_entry(model_bytes: bytes, horizons: tuple[float, ...]) -> dict[str, Any]:
    """The manifest's ``horizon`` and ``horizons`` keys for a graph."""
    ins, outs = tensor_specs(session(model_bytes))
    return {
        "horizon": {
            "file": HORIZON_FILE,
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "inputs": ins,
            "outputs": outs,
        },
        "horizons": [float(h) for h in horizons],
    }


def add_horizon(
    src: Path,
    model: nn.Module,
    dest: Path,
    *,
    windows: F32,
    windows_source: str,
    evaluation: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    version: str | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Publish at ``dest`` a copy of the model directory ``src`` with the
    horizon graph of ``model`` added (or replaced); the other graphs are
    kept byte for byte, the manifest says so, and the version changes.

    Args:
        src: a published model directory.
        model: a :class:`trainer.models.horizon.HorizonNet`.
        dest: where to publish (may be ``src`` itself with ``force``).
        windows: raw windows for the parity check.
        windows_source: where they came from (recorded).
        evaluation: the horizon model's metrics (``evaluation.horizon``).
        provenance: where its weights came from.
        version: the new version; default: ``src``'s date format with a
            digest of the old version and the new weights.
        force: replace an existing ``dest``.
        log: where progress lines go.

    Raises:
        ExportError: ``dest`` exists without ``force``, or the result fails
            the daemon's checks.
        ParityError: onnxruntime disagrees with torch.
    """
    from export import ExportError, publish_new_dir
    from export.manifest import default_version

    old = load_manifest(src)
    if dest.exists() and not force:
        raise ExportError(f"{dest}: exists (pass --force to replace it)")
    horizons = tuple(float(h) for h in model.cfg.horizons)  # type: ignore[union-attr]
    data = export_horizon(model)
    parity = horizon_parity(model, data, windows)
    log(f"verify: horizon max rel err {parity.max_rel_err:.2e} on {parity.n} (window, step) pairs")
    digest = hashlib.sha256((old.version + weights_digest(model)).encode()).hexdigest()
    version = version or default_version(digest)
    raw = old.to_json()
    raw.update(horizon_manifest_entry(data, horizons))
    raw["version"] = version
    raw["created"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    raw.setdefault("evaluation", {})["horizon"] = jsonable(evaluation or {})
    raw.setdefault("parity", {})["horizon"] = parity.to_json() | {"inputs": windows_source}
    exp = raw.setdefault("export", {})
    exp.setdefault("provenance", {})["horizon"] = jsonable(provenance or {})
    exp.setdefault("provenance", {})["horizon_added_to"] = old.version
    exp.setdefault("sizes_bytes", {})[HORIZON_FILE] = len(data)
    exp.setdefault("op_counts", {})
    from export.to_onnx import op_counts

    exp["op_counts"][HORIZON_FILE] = op_counts(data)
    manifest = Manifest.from_json(json.loads(json.dumps(raw)))
    files = {
        graph.file: (src / graph.file).read_bytes() for graph in (old.forecaster, old.allocator)
    }
    publish_new_dir(dest, files | {HORIZON_FILE: data}, manifest, force=force)
    log(f"export: published {dest} (version {version}, horizons {list(horizons)})")
    return manifest
