"""Optional int8 graphs: dynamic quantisation, kept only where it wins.

Each graph is quantised with ``onnxruntime.quantization.quantize_dynamic``
(int8 weights, activations quantised on the fly) and kept only if, measured
in the same run with float and int8 interleaved, it is faster at both batch
1 and batch 1000 by at least :data:`MIN_SPEEDUP`, and it loses at most 1%:
for the forecaster, the MAE of each output against the float graph divided
by the float output's mean magnitude (normalised MAE) is <= 0.01; for the
allocator, the greedy action agrees with the float graph's on >= 99% of the
parity states.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from bwpredd.manifest import ALLOCATOR_INPUT, FORECASTER_INPUT
from bwpredd.modeldir import session
from export.verify import F32

__all__ = ["MAX_LOSS", "MIN_SPEEDUP", "quantize_bytes", "try_int8"]

MAX_LOSS = 0.01
MIN_SPEEDUP = 1.05  # "measurably faster": 5% beyond timing noise


def quantize_bytes(model_bytes: bytes) -> bytes:
    """Dynamically quantise a serialised float graph to int8 weights.

    Args:
        model_bytes: the float ONNX model.
    """
    with tempfile.TemporaryDirectory(prefix="bwpredd-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        # quantize_dynamic logs a pre-processing hint on the root logger at
        # WARNING on every call; the accuracy check below is what matters.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        return dst.read_bytes()


def try_int8(
    f_bytes: bytes,
    a_bytes: bytes,
    windows: F32,
    states: F32,
    *,
    rounds: tuple[int, int] = (300, 30),
    log: Callable[[str], None] = print,
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Quantise both graphs and keep each int8 graph only where it wins.

    Args:
        f_bytes: the float forecaster graph.
        a_bytes: the float allocator graph.
        windows: the parity windows (accuracy is measured on them).
        states: the parity states built from them.
        rounds: timed calls of each graph at batch 1 and at batch 1000.
        log: where progress lines go.

    Returns:
        The forecaster and allocator graphs to ship (each float or int8) and
        the report for the manifest.
    """
    report: dict[str, Any] = {
        "method": "onnxruntime.quantization.quantize_dynamic, QInt8 weights",
        "rule": f"keep int8 if >= {MIN_SPEEDUP}x faster at batch 1 and 1000 and loses <= 1%",
    }
    chosen: list[bytes] = []
    for name, data, feed_name, inputs in (
        ("forecaster", f_bytes, FORECASTER_INPUT, windows),
        ("allocator", a_bytes, ALLOCATOR_INPUT, states),
    ):
        log(f"int8: quantising {name}")
        q_bytes = quantize_bytes(data)
        f_sess, q_sess = session(data), session(q_bytes)
        ref = _run(f_sess, feed_name, inputs)
        got = _run(q_sess, feed_name, inputs)
        if name == "forecaster":
            loss = max(
                float(np.abs(g - r).mean() / max(float(np.abs(r).mean()), 1e-12))
                for g, r in zip(got, ref, strict=True)
            )
            accuracy = {"max_normalised_mae_vs_float": loss}
        else:
            (q_ref,), (q_got,) = ref, got
            agree = float((q_ref.argmax(axis=1) == q_got.argmax(axis=1)).mean())
            loss = 1.0 - agree
            accuracy = {"greedy_action_agreement_vs_float": agree}
        speed = _speedups(f_sess, q_sess, feed_name, inputs, rounds)
        fast = all(s >= MIN_SPEEDUP for s in speed["speedup"].values())
        keep = fast and loss <= MAX_LOSS
        verdict = "int8" if keep else "float32"
        why = (
            []
            if keep
            else [w for w, bad in (("slower", not fast), ("less accurate", loss > MAX_LOSS)) if bad]
        )
        log(
            f"int8: {name}: {verdict} wins ({', '.join(why) or 'faster and within 1%'}); "
            f"speed-up batch1 {speed['speedup']['batch1']:.2f}x, batch1000 "
            f"{speed['speedup']['batch1000']:.2f}x; loss {loss:.4f}; "
            f"size {len(data) // 1024} -> {len(q_bytes) // 1024} KiB"
        )
        report[name] = {
            "chosen": verdict,
            **accuracy,
            **speed,
            "sizes_bytes": {"float32": len(data), "int8": len(q_bytes)},
        }
        chosen.append(q_bytes if keep else data)
    return chosen[0], chosen[1], report


def _run(sess: ort.InferenceSession, feed_name: str, inputs: F32) -> list[Any]:
    return [np.asarray(o, dtype=np.float64) for o in sess.run(None, {feed_name: inputs})]


def _speedups(
    f_sess: ort.InferenceSession,
    q_sess: ort.InferenceSession,
    feed_name: str,
    inputs: F32,
    rounds: tuple[int, int],
) -> dict[str, Any]:
    """Median latencies, float and int8 interleaved so both see the same load."""
    timings: dict[str, dict[str, float]] = {"float32_ms": {}, "int8_ms": {}}
    speedup: dict[str, float] = {}
    for n, reps in zip((1, 1000), rounds, strict=True):
        x = np.ascontiguousarray(np.resize(inputs, (n, *inputs.shape[1:])))
        feeds = {feed_name: x}
        f_sess.run(None, feeds)
        q_sess.run(None, feeds)
        f_t: list[float] = []
        q_t: list[float] = []
        for _ in range(reps):
            for sess, out in ((f_sess, f_t), (q_sess, q_t)):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                out.append(time.perf_counter() - t0)
        f_ms, q_ms = float(np.median(f_t)) * 1e3, float(np.median(q_t)) * 1e3
        timings["float32_ms"][f"batch{n}"] = round(f_ms, 4)
        timings["int8_ms"][f"batch{n}"] = round(q_ms, 4)
        speedup[f"batch{n}"] = round(f_ms / q_ms, 3)
    return {**timings, "speedup": speedup}
