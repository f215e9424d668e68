"""Describe an exported model directory: build its validated manifest.

The I/O specs are read back from the onnxruntime sessions (not restated from
the export call), so the manifest says what the files really take and give,
and the result goes through :meth:`bwpredd.manifest.Manifest.from_json`, the
daemon's own validator, before anything is written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

import bwpredd.manifest as bm
from bwpredd.manifest import FORMAT_VERSION, Manifest
from bwpredd.schema import FEATURES, UNITS, WINDOW

__all__ = ["build_manifest", "default_version", "jsonable", "tensor_specs", "weights_digest"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}


def weights_digest(*models: nn.Module) -> str:
    """sha256 over the models' parameters and buffers (names, dtypes, shapes, bytes).

    Args:
        models: the torch modules, in a fixed order.
    """
    digest = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            if t.dtype == torch.bfloat16:
                t = t.float()
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def default_version(digest: str, now: dt.datetime | None = None) -> str:
    """``YYYY.MM.DD-<first 8 hex of the weights digest>`` in UTC.

    Args:
        digest: from :func:`weights_digest`.
        now: the time to stamp (defaults to now, UTC).
    """
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y.%m.%d}-{digest[:8]}"


def tensor_specs(sess: ort.InferenceSession) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The inputs and outputs of a session as manifest ``TensorSpec`` dicts.

    Args:
        sess: an onnxruntime session; symbolic dims become ``None``.
    """

    def spec(arg: Any) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else None for d in arg.shape]
        return {"name": arg.name, "shape": shape, "dtype": _ORT_TYPES.get(arg.type, arg.type)}

    return [spec(a) for a in sess.get_inputs()], [spec(a) for a in sess.get_outputs()]


def jsonable(value: Any) -> Any:
    """Checkpoint metadata made JSON-safe: tensors and numpy values become
    lists and floats, non-finite floats become strings, tuples become lists.

    Args:
        value: what the checkpoint carried.
    """
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if isinstance(value, np.ndarray | np.generic):
        return jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def build_manifest(
    *,
    version: str,
    forecaster_file: str,
    forecaster_sha256: str,
    forecaster_session: ort.InferenceSession,
    allocator_file: str,
    allocator_sha256: str,
    allocator_session: ort.InferenceSession,
    state_layout: tuple[str, ...],
    feature_defaults: Mapping[str, float],
    interval: Mapping[str, float],
    opset: int,
    versions: Mapping[str, str],
    evaluation: Mapping[str, Any],
    training_data: Mapping[str, Any],
    extra: Mapping[str, Any],
    created: dt.datetime | None = None,
) -> Manifest:
    """Assemble and validate the manifest of a model directory.

    Args:
        version: the model version (``model_version`` in every response).
        forecaster_file: file name of the forecaster graph.
        forecaster_sha256: its sha256.
        forecaster_session: a session on it (I/O specs are read from it).
        allocator_file: file name of the allocator graph.
        allocator_sha256: its sha256.
        allocator_session: a session on it.
        state_layout: the allocator state's column names.
        feature_defaults: what a missing feature reads as.
        interval: ``low_quantile`` and ``high_quantile`` of the interval.
        opset: the ONNX opset of the graphs.
        versions: tool versions (torch, onnx, onnxruntime, bwpredd).
        evaluation: metrics carried in the checkpoints.
        training_data: training data summaries carried in the checkpoints.
        extra: further top-level keys (parity, export details, int8 verdict).
        created: the creation time (defaults to now, UTC).

    Raises:
        bwpredd.errors.ManifestError: the result breaks the schema.
    """
    created = created or dt.datetime.now(dt.UTC)
    f_in, f_out = tensor_specs(forecaster_session)
    a_in, a_out = tensor_specs(allocator_session)
    raw: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "version": version,
        "created": created.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "window": WINDOW,
        "features": list(FEATURES),
        "units": dict(UNITS),
        "feature_defaults": {k: float(v) for k, v in feature_defaults.items()},
        "forecaster": {
            "file": forecaster_file,
            "sha256": forecaster_sha256,
            "inputs": f_in,
            "outputs": f_out,
        },
        "allocator": {
            "file": allocator_file,
            "sha256": allocator_sha256,
            "inputs": a_in,
            "outputs": a_out,
        },
        "state_layout": list(state_layout),
        "interval": {k: float(v) for k, v in interval.items()},
        "opset": opset,
        "versions": dict(versions),
        "evaluation": jsonable(evaluation),
        "training_data": jsonable(training_data),
        **jsonable(extra),
    }
    return bm.Manifest.from_json(raw)
