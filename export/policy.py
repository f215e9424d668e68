"""The policy graph: the forecaster, the allocator's state and the allocator
in one ONNX graph, so a peer's allocation right after its new sample is one
onnxruntime run instead of two runs and the state's NumPy in between.

``policy.onnx`` takes ``window`` float32[N,10,4] and ``step_s``
float32[N,1] and gives the forecaster's ``bandwidth_mbps``, ``low_mbps`` and
``high_mbps`` float32[N,1] and the allocator's ``q_values`` float32[N,10].
It is built from the directory's two graphs as they are (their nodes and
weights copied, no retraining, no torch), with the state of
:func:`bwpredd.state.build_state` written as ONNX nodes between them, column
by column in :data:`bwpredd.state.STATE_LAYOUT` order. The forecaster's part
is the same subgraph, so its outputs are the forecaster's bit for bit; the
state is computed in float32 where the NumPy one runs in float64, so the
Q-values differ from the two-graph path by float rounding
(:data:`POLICY_Q_TOLERANCE`), and the export checks that every greedy action
agrees on its parity windows. The daemon checks the same on its smoke
windows when it loads the directory.

:func:`export.export_model_dir` ships it with the other graphs;
:func:`add_policy` adds it to an already published directory, keeping every
other file byte for byte (``python -m export --add-policy-to DIR``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from bwpredd.manifest import (
    ALLOCATOR_INPUT,
    FORECASTER_INPUT,
    FORECASTER_OUTPUTS,
    POLICY_INPUTS,
    POLICY_OUTPUTS,
    Manifest,
    load_manifest,
)
from bwpredd.modeldir import policy_agreement, session
from bwpredd.schema import BW, LAT, LOSS, REL, WINDOW
from bwpredd.state import CAPACITY_FLOOR_MBPS, STATE_LAYOUT, build_state, reference_capacity
from export.manifest import tensor_specs
from export.to_onnx import op_counts
from export.verify import F32, ParityError

__all__ = [
    "POLICY_FILE",
    "add_policy",
    "fuse_policy",
    "policy_manifest_entry",
    "policy_parity",
]

POLICY_FILE = "policy.onnx"
_PREFIX = "allocator/"  # the allocator's names inside the policy graph


class _Builder:
    """Appends nodes and constants under the ``state/`` namespace."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: dict[str, onnx.TensorProto] = {}
        self._n = 0

    def const(self, value: float | list[int] | int, dtype: Any = np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        shape = "x".join(map(str, arr.shape)) or "scalar"
        name = f"state/c_{arr.dtype}_{shape}_{'_'.join(map(str, arr.ravel().tolist()))}"
        if name not in self.constants:
            self.constants[name] = numpy_helper.from_array(arr, name)
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs: Any) -> str:
        self._n += 1
        names = [f"state/{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0]

    def feature(self, window: str, index: int) -> str:
        """``window[:, :, index]``: ``[N, WINDOW]``."""
        return self.op("Gather", window, self.const(index, np.int64), axis=2)

    def column(self, x: str, index: int) -> str:
        """``x[:, index:index + 1]``: ``[N, 1]``."""
        return self.op("Gather", x, self.const([index], np.int64), axis=1)


def _state_nodes(b: _Builder, window: str, step_s: str, forecast: list[str]) -> str:
    """:func:`bwpredd.state.build_state` as nodes on the forecaster's
    ``(point, low, high)``; returns the state's name."""
    point, low, high = forecast
    bw, lat, loss, rel = (b.feature(window, i) for i in (BW, LAT, LOSS, REL))
    s = b.op("TopK", bw, b.const([WINDOW], np.int64), outputs=2, axis=1, largest=0, sorted=1)
    # _p90: np.percentile's linear interpolation at 0.9 (W - 1), floored.
    pos = 0.9 * (WINDOW - 1)
    lo_i, hi_i = int(pos), min(int(pos) + 1, WINDOW - 1)
    s_lo, s_hi = b.column(s, lo_i), b.column(s, hi_i)
    p90 = b.op("Add", s_lo, b.op("Mul", b.op("Sub", s_hi, s_lo), b.const(pos - lo_i)))
    cap = b.op("Max", p90, b.const(CAPACITY_FLOOR_MBPS))
    half = WINDOW // 2
    median = (
        b.column(s, half)
        if WINDOW % 2
        else b.op("Mul", b.op("Add", b.column(s, half - 1), b.column(s, half)), b.const(0.5))
    )
    mean = b.op("ReduceMean", bw, axes=[1], keepdims=1)
    dev = b.op("Sub", bw, mean)
    std = b.op("Sqrt", b.op("ReduceMean", b.op("Mul", dev, dev), axes=[1], keepdims=1))
    lat_min = b.op("ReduceMin", lat, axes=[1], keepdims=1)
    base_lat = b.op("Max", lat_min, b.const(1e-3))
    lat_new, lat_prev = b.column(lat, WINDOW - 1), b.column(lat, WINDOW - 2)
    lat_step = b.op("Sub", lat_new, lat_prev)
    step_ms = b.op("Mul", step_s, b.const(1000.0))
    loss_new = b.column(loss, WINDOW - 1)
    # The engine hands the state an interval that brackets the point.
    low = b.op("Min", low, point)
    high = b.op("Max", high, point)
    columns: dict[str, str] = {
        "log1p_latency_ms": b.op("Log", b.op("Add", lat_new, b.const(1.0))),
        "bandwidth_over_capacity": b.column(bw, WINDOW - 1),
        "packet_loss": loss_new,
        "reliability": b.column(rel, WINDOW - 1),
        "forecast_over_capacity": point,
        "low_over_capacity": low,
        "high_over_capacity": high,
        "mean_over_capacity": mean,
        "std_over_capacity": std,
        "queue_signal": b.op("Sub", b.op("Div", lat_new, base_lat), b.const(1.0)),
        "latency_trend": b.op("Div", lat_step, base_lat),
        "loss_trend": b.op("Sub", loss_new, b.op("ReduceMean", loss, axes=[1], keepdims=1)),
        "queue_steps": b.op("Div", b.op("Sub", lat_new, lat_min), step_ms),
        "queue_trend_steps": b.op("Div", lat_step, step_ms),
        "min_over_capacity": b.column(s, 0),
        "median_over_capacity": median,
    }
    missing = [name for name in STATE_LAYOUT if name not in columns]
    if missing or len(columns) != len(STATE_LAYOUT):
        raise ValueError(f"the policy graph does not know state columns {missing}")
    ordered = [
        b.op("Div", columns[name], cap) if name.endswith("_over_capacity") else columns[name]
        for name in STATE_LAYOUT
    ]
    state = b.op("Concat", *ordered, axis=1)
    return b.op("Clip", state, b.const(-50.0), b.const(50.0))


def fuse_policy(forecaster: bytes, allocator: bytes) -> bytes:
    """The policy graph of a forecaster and an allocator graph.

    Raises:
        ValueError: a graph's inputs or outputs are not the model contract's.
    """
    f = onnx.load_from_string(forecaster)
    a = onnx.load_from_string(allocator)
    f_in = [i.name for i in f.graph.input]
    f_out = [o.name for o in f.graph.output]
    if f_in != [FORECASTER_INPUT] or f_out != list(FORECASTER_OUTPUTS):
        raise ValueError(f"forecaster graph: inputs {f_in}, outputs {f_out}")
    if [i.name for i in a.graph.input] != [ALLOCATOR_INPUT]:
        raise ValueError(f"allocator graph: inputs {[i.name for i in a.graph.input]}")
    if f.opset_import != a.opset_import:
        raise ValueError("forecaster and allocator graphs import different opsets")
    a = compose.add_prefix(a, _PREFIX)
    b = _Builder()
    state = _state_nodes(b, FORECASTER_INPUT, POLICY_INPUTS[1], f_out)
    # The allocator reads the state under its own (prefixed) input name.
    b.nodes.append(helper.make_node("Identity", [state], [_PREFIX + ALLOCATOR_INPUT]))
    q_out = onnx.ValueInfoProto(name=POLICY_OUTPUTS[3])
    q_out.type.CopyFrom(a.graph.output[0].type)
    q_node = helper.make_node("Identity", [a.graph.output[0].name], [POLICY_OUTPUTS[3]])
    graph = helper.make_graph(
        [*f.graph.node, *b.nodes, *a.graph.node, q_node],
        "policy",
        [
            f.graph.input[0],
            helper.make_tensor_value_info(POLICY_INPUTS[1], TensorProto.FLOAT, ["N", 1]),
        ],
        [*f.graph.output, q_out],
        [*f.graph.initializer, *b.constants.values(), *a.graph.initializer],
    )
    model = helper.make_model(graph, opset_imports=f.opset_import, ir_version=f.ir_version)
    model.producer_name = "bwpredd export.policy"
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def policy_parity(
    forecaster: bytes, allocator: bytes, policy: bytes, windows: F32
) -> dict[str, Any]:
    """The policy graph against the two graphs on ``windows`` at steps of 0.5,
    1 and 5 s (:func:`bwpredd.manifest.policy_agreement`).

    Raises:
        ParityError: a forecast differs, a greedy action differs, or a
            Q-value is off by more than the tolerance.
    """
    fsess, asess, psess = session(forecaster), session(allocator), session(policy)
    windows = np.ascontiguousarray(windows, dtype=np.float32)
    worst = 0.0
    for step in (0.5, 1.0, 5.0):
        steps = np.full((len(windows), 1), step, dtype=np.float32)
        p, lo, hi = (
            o[:, 0] for o in fsess.run(list(FORECASTER_OUTPUTS), {FORECASTER_INPUT: windows})
        )
        states = build_state(
            windows,
            p,
            np.minimum(lo, p),
            np.maximum(hi, p),
            steps[:, 0],
            reference_capacity(windows),
        )
        (q,) = asess.run(None, {ALLOCATOR_INPUT: states})
        fused = psess.run(
            list(POLICY_OUTPUTS), {POLICY_INPUTS[0]: windows, POLICY_INPUTS[1]: steps}
        )
        problem, err = policy_agreement(
            (p, lo, hi, q), [o if i == 3 else o[:, 0] for i, o in enumerate(fused)]
        )
        if problem:
            raise ParityError(f"policy graph at step {step:g} s: {problem}")
        worst = max(worst, err)
    return {"n": len(windows), "steps_s": [0.5, 1.0, 5.0], "max_abs_q_err": worst}


def policy_manifest_entry(model_bytes: bytes) -> dict[str, Any]:
    """The manifest's ``policy`` key for a policy graph."""
    ins, outs = tensor_specs(session(model_bytes))
    return {
        "policy": {
            "file": POLICY_FILE,
            "sha256": hashlib.sha256(model_bytes).hexdigest(),
            "inputs": ins,
            "outputs": outs,
        }
    }


def add_policy(
    src: Path,
    dest: Path,
    *,
    windows: F32,
    windows_source: str,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Publish at ``dest`` a copy of the model directory ``src`` with the
    policy graph of its forecaster and allocator added (or rebuilt); every
    other file is kept byte for byte and the version stays: the answers are
    the same, one onnxruntime run computes them.

    Raises:
        ExportError: ``dest`` exists without ``force``, or the result fails
            the daemon's checks.
        ParityError: the policy graph disagrees with the two graphs.
    """
    from export import ExportError, publish_new_dir

    old = load_manifest(src)
    if dest.exists() and not force:
        raise ExportError(f"{dest}: exists (pass --force to replace it)")
    kept = [old.forecaster, old.allocator, *((old.horizon,) if old.horizon else ())]
    files = {graph.file: (src / graph.file).read_bytes() for graph in kept}
    f_bytes, a_bytes = files[old.forecaster.file], files[old.allocator.file]
    data = fuse_policy(f_bytes, a_bytes)
    parity = policy_parity(f_bytes, a_bytes, data, windows)
    log(
        f"verify: policy graph on {parity['n']} windows x 3 steps: forecasts identical, "
        f"greedy actions identical, Q-values within {parity['max_abs_q_err']:.2e}"
    )
    raw = old.to_json()
    raw.update(policy_manifest_entry(data))
    raw.setdefault("parity", {})["policy"] = parity | {"inputs": windows_source}
    exp = raw.setdefault("export", {})
    exp.setdefault("sizes_bytes", {})[POLICY_FILE] = len(data)
    exp.setdefault("op_counts", {})[POLICY_FILE] = op_counts(data)
    manifest = Manifest.from_json(json.loads(json.dumps(raw)))
    publish_new_dir(dest, files | {POLICY_FILE: data}, manifest, force=force)
    log(f"export: published {dest} (version {old.version}, policy graph added)")
    return manifest
