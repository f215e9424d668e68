"""The forecaster of a published model directory, back in PyTorch.

A model directory ships ONNX graphs and no PyTorch checkpoint (``python -m
export`` records the checkpoint's sha256 in the manifest, not the file), so
fine-tuning the serving model starts from its graph: :func:`load_forecaster`
rebuilds a :class:`~trainer.models.forecaster.Forecaster` from
``forecaster.onnx``'s initializers and proves it with a parity check against
onnxruntime running the directory exactly as the daemon does.

How the weights map back (the legacy TorchScript exporter of
:mod:`export.to_onnx`):

- every weight is found through the node that uses it, named after the
  module that exported it (``/members.0/norms.0/bn/BatchNormalization``,
  ``/members.0/head/head.5/Gemm``): initializer names are not enough, since
  the exporter shares equal tensors (an untrained network's batch-norm
  statistics) under one name, behind ``Identity`` nodes;
- each ``nn.LSTM`` became an ONNX ``LSTM`` node named
  ``/members.<m>/lstms.<l>/LSTM`` whose inputs ``W`` ``[1, 4H, in]``, ``R``
  ``[1, 4H, H]`` and ``B`` ``[1, 8H]`` hold the gates in ONNX's order
  (input, output, forget, cell) with both biases concatenated; PyTorch's
  order is (input, forget, cell, output);
- the architecture (members, LSTM and dense sizes) is read from those
  shapes; ``low_quantile``/``high_quantile`` from the manifest;
- ``interval_scale``, folded into a constant, is measured: the ratio of the
  graph's upper interval to the network's upper half-width (relative log
  space), snapped to the graph's scalar constant when one matches;
- ``residual`` is not visible in the weights: both settings are tried and
  the one that passes the parity check is kept;
- a graph that :mod:`export.slim` slimmed has no batch-norm nodes: each
  norm was folded into the layer that reads it (the next LSTM's input
  weights and bias, or the head's first Gemm), and its parameters were
  recorded under :data:`FOLDED_NORMS_KEY` in the graph's metadata. They
  come back from there, and the folding is undone
  (``W = W' / a``, ``b = b' - W c``, :func:`norm_affine`), so fine-tuning
  starts from the network that was trained, norms and all.

The check: every output within 1e-4 relative (``|ort - torch| / max(|torch|,
1e-3 m)``, the floor of :mod:`export.verify`) on the windows given plus
seeded synthetic windows spanning 0.1 Mbit/s to 10 Gbit/s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import numpy_helper

from bwpredd.manifest import load_manifest
from bwpredd.modeldir import load_model, synthetic_windows
from bwpredd.schema import BW
from trainer.models.forecaster import Forecaster, ForecasterConfig

__all__ = [
    "FOLDED_NORMS_KEY",
    "MAX_REL_ERR",
    "Recovered",
    "RecoveryError",
    "load_forecaster",
    "norm_affine",
]

F32 = npt.NDArray[np.float32]
MAX_REL_ERR = 1e-4
# Nodes by the module that exported them (the legacy exporter's scope names).
_LSTM_NODE = re.compile(r"/members\.(\d+)/lstms\.(\d+)/LSTM$")
_BN_NODE = re.compile(r"/members\.(\d+)/norms\.(\d+)/bn/BatchNormalization$")
_GEMM_NODE = re.compile(r"/members\.(\d+)/head/head\.(\d+)/Gemm$")
# ONNX LSTM gate blocks (i, o, f, c) -> PyTorch's (i, f, c, o).
_GATES_TO_TORCH = (0, 2, 3, 1)
_SYNTHETIC_WINDOWS = 512
# Metadata key of a slimmed graph: a JSON list of the norms folded away,
# each {"norm": BN node name, "into": node name, "epsilon": float,
# "weight"/"bias"/"running_mean"/"running_var": [float, ...]}.
FOLDED_NORMS_KEY = "bwpredd.folded_norms"
_NORM_PARAMS = ("weight", "bias", "running_mean", "running_var")


def norm_affine(
    weight: npt.ArrayLike, bias: npt.ArrayLike, mean: npt.ArrayLike, var: npt.ArrayLike, eps: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """``(a, c)`` with ``norm(x) = a x + c`` per channel for an inference-mode
    batch norm, in float64 (what folding multiplies in and unfolding divides out)."""
    a = np.asarray(weight, np.float64) / np.sqrt(np.asarray(var, np.float64) + eps)
    return a, np.asarray(bias, np.float64) - np.asarray(mean, np.float64) * a


class RecoveryError(ValueError):
    """The graph's weights cannot be put back into a Forecaster that
    reproduces it."""


@dataclass
class Recovered:
    """A forecaster rebuilt from a model directory, and the proof.

    Attributes:
        model: the forecaster, in eval mode.
        version: the directory's model version.
        forecaster_sha256: the manifest's sha256 of ``forecaster.onnx``.
        feature_defaults: the directory's declared feature defaults.
        parity: ``{"max_rel_err", "n", "windows"}`` of the check.
    """

    model: Forecaster
    version: str
    forecaster_sha256: str
    feature_defaults: dict[str, float]
    parity: dict[str, Any]


def load_forecaster(model_dir: Path, windows: F32 | None = None, seed: int = 0) -> Recovered:
    """Rebuild the forecaster of ``model_dir`` in PyTorch and check it.

    Args:
        model_dir: a published model directory (``bwpredd/models/default``).
        windows: raw windows ``[N, WINDOW, WIDTH]`` to check on (e.g. the
            data about to be trained on), besides the synthetic ones.
        seed: seeds the synthetic windows.

    Raises:
        bwpredd.errors.BwpreddError: the directory does not load.
        RecoveryError: no rebuilt forecaster matches onnxruntime.
    """
    model_dir = Path(model_dir)
    served = load_model(model_dir)  # the daemon's own checks: sha256, I/O, smoke test
    manifest = served.manifest
    data = (model_dir / manifest.forecaster.file).read_bytes()
    check = synthetic_windows(_SYNTHETIC_WINDOWS, seed)
    described = f"{_SYNTHETIC_WINDOWS} synthetic (seed {seed})"
    if windows is not None and len(windows):
        check = np.concatenate([np.asarray(windows, np.float32), check])
        described = f"{len(windows)} given + {described}"
    check = np.ascontiguousarray(check)
    want = served.run_forecaster(check)
    proto = onnx.load_from_string(data)
    cfg, state = _weights(proto, manifest.interval)
    tried: list[str] = []
    for residual in (True, False):
        model = _build(replace(cfg, residual=residual), state)
        model.cfg.interval_scale = _interval_scale(model, check, want[2], _scalars(proto))
        err = _max_rel_err(model, check, want)
        if err <= MAX_REL_ERR:
            return Recovered(
                model=model,
                version=manifest.version,
                forecaster_sha256=manifest.forecaster.sha256,
                feature_defaults=dict(load_manifest(model_dir).feature_defaults),
                parity={"max_rel_err": err, "n": len(check), "windows": described},
            )
        tried.append(f"residual={residual}: max rel err {err:.3g}")
    raise RecoveryError(
        f"{model_dir / manifest.forecaster.file}: its weights do not rebuild a forecaster "
        f"matching onnxruntime within {MAX_REL_ERR:g} ({'; '.join(tried)})"
    )


def _weights(
    proto: onnx.ModelProto, interval: dict[str, float]
) -> tuple[ForecasterConfig, dict[str, torch.Tensor]]:
    """The architecture and a PyTorch state dict, found through the nodes
    that use each weight (the exporter shares equal tensors, e.g. the running
    statistics of untrained batch norms, under one name behind Identity
    nodes)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:  # constants, and names the exporter aliased
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    state: dict[str, torch.Tensor] = {}
    unfold = _folded_norms(proto, state)
    sizes: dict[tuple[int, int], int] = {}
    dense: dict[int, int] = {}
    in_size = 0

    def param(node: onnx.NodeProto, i: int) -> npt.NDArray[Any]:
        if len(node.input) <= i or node.input[i] not in inits:
            raise RecoveryError(f"{node.name}: input {i} is not a weight of the graph")
        return inits[node.input[i]]

    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if found := _BN_NODE.search(node.name):
            if abs(float(attrs.get("epsilon", 1e-5)) - 1e-5) > 1e-9:
                raise RecoveryError(f"{node.name}: epsilon {attrs['epsilon']}, the model uses 1e-5")
            prefix = f"members.{found.group(1)}.norms.{found.group(2)}.bn"
            for i, key in enumerate(("weight", "bias", "running_mean", "running_var"), 1):
                state[f"{prefix}.{key}"] = _tensor(param(node, i))
        elif found := _GEMM_NODE.search(node.name):
            if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise RecoveryError(f"{node.name}: a scaled Gemm is not a Linear layer")
            w = param(node, 1) if attrs.get("transB", 0) else param(node, 1).T
            bias = param(node, 2)
            if node.name in unfold:  # W' = W diag(a), b' = b + W c
                a, c = unfold.pop(node.name)
                w = w.astype(np.float64) / a[None, :]
                bias = bias.astype(np.float64) - w @ c
            prefix = f"members.{found.group(1)}.head.{found.group(2)}"
            state[f"{prefix}.weight"], state[f"{prefix}.bias"] = _tensor(w), _tensor(bias)
            if found.group(1) == "0":
                dense[int(found.group(2))] = w.shape[0]
        elif node.op_type == "LSTM":
            found = _LSTM_NODE.search(node.name)
            if found is None or set(attrs) - {"hidden_size"}:
                raise RecoveryError(f"LSTM node {node.name!r} is not one this exporter writes")
            m, layer = int(found.group(1)), int(found.group(2))
            w, r, b = (param(node, i)[0] for i in (1, 2, 3))
            hidden = r.shape[1]
            if node.name in unfold:  # W' = W diag(a), b'[:4H] = b[:4H] + W c
                a, c = unfold.pop(node.name)
                w = w.astype(np.float64) / a[None, :]
                b = b.astype(np.float64).copy()
                b[: 4 * hidden] -= w @ c
            prefix = f"members.{m}.lstms.{layer}"
            state[f"{prefix}.weight_ih_l0"] = _to_torch_gates(w, hidden)
            state[f"{prefix}.weight_hh_l0"] = _to_torch_gates(r, hidden)
            state[f"{prefix}.bias_ih_l0"] = _to_torch_gates(b[: 4 * hidden], hidden)
            state[f"{prefix}.bias_hh_l0"] = _to_torch_gates(b[4 * hidden :], hidden)
            sizes[(m, layer)] = hidden
            if (m, layer) == (0, 0):
                in_size = w.shape[1]
    if unfold:
        raise RecoveryError(f"{FOLDED_NORMS_KEY}: no LSTM or Gemm node named {sorted(unfold)}")
    members = sorted({m for m, _ in sizes})
    if not members or members != list(range(len(members))) or len(dense) < 2:
        raise RecoveryError("the graph holds no forecaster members this module knows")
    layers = sorted(layer for m, layer in sizes if m == 0)
    cfg = ForecasterConfig(
        n_features=in_size,
        lstm_sizes=tuple(sizes[(0, layer)] for layer in layers),  # type: ignore[arg-type]
        dense_sizes=(dense[min(dense)], dense[sorted(dense)[1]]),
        low_quantile=float(interval["low_quantile"]),
        high_quantile=float(interval["high_quantile"]),
        members=len(members),
    )
    return cfg, state


def _folded_norms(
    proto: onnx.ModelProto, state: dict[str, torch.Tensor]
) -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """Put the norms :mod:`export.slim` folded away back into ``state``;
    return ``{node name: (a, c)}`` of the layers they were folded into."""
    raw = next((p.value for p in proto.metadata_props if p.key == FOLDED_NORMS_KEY), None)
    if raw is None:
        return {}
    unfold = {}
    try:
        entries = json.loads(raw)
        for entry in entries:
            found = _BN_NODE.search(entry["norm"])
            if found is None:
                raise RecoveryError(f"{FOLDED_NORMS_KEY}: {entry['norm']!r} is not a norm's node")
            eps = float(entry["epsilon"])
            if abs(eps - 1e-5) > 1e-9:
                raise RecoveryError(f"{entry['norm']}: epsilon {eps}, the model uses 1e-5")
            prefix = f"members.{found.group(1)}.norms.{found.group(2)}.bn"
            params = [np.asarray(entry[key], dtype=np.float32) for key in _NORM_PARAMS]
            for key, value in zip(_NORM_PARAMS, params, strict=True):
                state[f"{prefix}.{key}"] = _tensor(value)
            weight, bias, mean, var = params
            unfold[str(entry["into"])] = norm_affine(weight, bias, mean, var, eps)
    except RecoveryError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise RecoveryError(f"{FOLDED_NORMS_KEY}: unreadable ({exc!r})") from exc
    return unfold


def _tensor(value: npt.NDArray[Any]) -> torch.Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))


def _to_torch_gates(value: npt.NDArray[Any], hidden: int) -> torch.Tensor:
    blocks = [value[k * hidden : (k + 1) * hidden] for k in _GATES_TO_TORCH]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(blocks), dtype=np.float32))


def _build(cfg: ForecasterConfig, state: dict[str, torch.Tensor]) -> Forecaster:
    model = Forecaster(cfg)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise RecoveryError(
            f"weights do not fit the architecture: missing {missing}, extra {extra}"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            shapes = f"{list(value.shape)} vs {list(own[key].shape)}"
            raise RecoveryError(f"{key}: graph shape {shapes} in the model")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _scalars(proto: onnx.ModelProto) -> list[float]:
    """Every scalar float constant of the graph (one of them is the interval scale)."""
    out = []
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            value = numpy_helper.to_array(node.attribute[0].t)
            if value.size == 1 and value.dtype.kind == "f":
                out.append(float(value.reshape(())))
    return out


@torch.no_grad()
def _interval_scale(model: Forecaster, x: F32, high: F32, scalars: list[float]) -> float:
    """The k with which ``model`` (built with k = 1) gives the graph's ``high``."""
    model.cfg.interval_scale = 1.0
    xt = torch.from_numpy(x)
    q = model.forward_rel(xt).numpy().astype(np.float64)
    m = model.scale(xt).numpy()[:, 0].astype(np.float64)
    eps = model.cfg.rel_eps
    above = q[:, 2] - q[:, 1]
    ok = (high > 0) & (above > 1e-3)
    if not ok.any():
        return 1.0
    r_high = np.log((high[ok].astype(np.float64) + eps * m[ok]) / m[ok])
    k = float(np.median((r_high - q[ok, 1]) / above[ok]))
    near = [c for c in scalars if c > 0 and abs(c - k) <= 1e-3 * k]
    return min(near, key=lambda c: abs(c - k)) if near else k


@torch.no_grad()
def _max_rel_err(model: Forecaster, x: F32, want: tuple[F32, F32, F32]) -> float:
    got = [t.numpy()[:, 0].astype(np.float64) for t in model(torch.from_numpy(x))]
    m = np.maximum(np.clip(x[:, :, BW], 0, None).mean(axis=1), 1e-3).astype(np.float64)
    err = 0.0
    for g, w in zip(got, want, strict=True):
        rel = np.abs(w.astype(np.float64) - g) / np.maximum(np.abs(g), 1e-3 * m)
        err = max(err, float(np.nan_to_num(rel, nan=np.inf).max()))
    return err
