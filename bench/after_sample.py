"""``python -m bench.after_sample``: the after-sample path in-process, piece by piece.

Times :meth:`Engine.forecast` and :meth:`Engine.allocate` and the pieces
they are made of on one peer's full window (and a 1,000-peer batch), as
thread CPU time, the minimum over interleaved rounds: the breakdown
``reports/profile.md`` gives for the path right after a new sample, where
the models run. Prints one line per piece in microseconds per call, then
the forecaster's arithmetic: multiply-adds per window (counted from the
graph's LSTM and matrix weights), the rate it ran at, the CPU's vector
extensions, and what forecasting every peer once a second costs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bwpredd import baselines
from bwpredd.engine import BASELINE_ALPHA, Engine, edge_pad
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model, synthetic_windows
from bwpredd.schema import WINDOW
from bwpredd.state import build_state, reference_capacity

__all__ = [
    "cpu_vector_flags",
    "forecaster_macs",
    "main",
    "optimised_nodes",
    "pieces",
    "time_pieces",
]

_VECTOR_FLAGS = ("avx", "fma", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")


def forecaster_macs(path: Path = DEFAULT_MODEL_DIR / "forecaster.onnx") -> int:
    """Multiply-adds of one window through the forecaster graph: each LSTM's
    input and recurrent weights once per step, each Gemm or MatMul with a
    weight initializer once (activations, gates and biases not counted)."""
    import onnx  # the train extra, as for export

    graph = onnx.load(str(path)).graph
    dims = {t.name: list(t.dims) for t in graph.initializer}
    macs = 0
    for node in graph.node:
        if node.op_type == "LSTM":
            macs += WINDOW * (math.prod(dims[node.input[1]]) + math.prod(dims[node.input[2]]))
        elif node.op_type in ("Gemm", "MatMul"):
            macs += sum(math.prod(dims[i]) for i in node.input[:2] if i in dims)
    return macs


def optimised_nodes(path: Path, batch_one: bool = True) -> int:
    """How many nodes onnxruntime runs for the graph at ``path`` once it has
    optimised it as the daemon's sessions do (at batch 1: the batch
    dimension fixed, as for one peer's answer)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        opts.log_severity_level = 3
        if batch_one:
            opts.add_free_dimension_override_by_name("N", 1)
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return len(onnx.load(opts.optimized_model_filepath).graph.node)


def cpu_vector_flags() -> list[str]:
    """Which of the x86 vector extensions onnxruntime's kernels choose among
    ``/proc/cpuinfo`` lists (empty where it is hidden or not x86)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    return [f for f in _VECTOR_FLAGS if f in have]


def pieces(k: int, model_dir: Path = DEFAULT_MODEL_DIR) -> dict[str, Callable[[], object]]:
    """The pieces of the after-sample path on ``k`` full windows, by name."""
    model = load_model(model_dir)
    engine = Engine(model)
    windows = np.ascontiguousarray(synthetic_windows(k, seed=1), dtype=np.float32)
    counts = np.full(k, windows.shape[1], dtype=np.int64)
    step = np.ones(k, dtype=np.float32)
    fc = engine.forecast(windows, counts)
    cap = reference_capacity(windows)
    return {
        "Engine.forecast": lambda: engine.forecast(windows, counts),
        "  run_forecaster": lambda: model.run_forecaster(windows),
        "  baselines.ewma": lambda: baselines.ewma(windows, counts, BASELINE_ALPHA),
        "  baselines.baseline_interval": lambda: baselines.baseline_interval(
            windows, fc.baseline, counts
        ),
        "Engine.allocate": lambda: engine.allocate(windows, counts, fc, step),
        "  edge_pad": lambda: edge_pad(windows, counts),
        "  reference_capacity": lambda: reference_capacity(windows),
        "  build_state": lambda: build_state(windows, fc.point, fc.low, fc.high, step, cap),
        "  run_allocator": lambda: model.run_allocator(
            build_state(windows, fc.point, fc.low, fc.high, step, cap)
        ),
        "forecast+allocate": lambda: engine.allocate(
            windows, counts, engine.forecast(windows, counts), step
        ),
    }


def time_pieces(
    fns: dict[str, Callable[[], object]], rounds: int = 15, calls: int = 200
) -> dict[str, float]:
    """Thread CPU microseconds per call of each function: the minimum over
    ``rounds`` interleaved rounds of ``calls`` calls."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.thread_time_ns()
            for _ in range(calls):
                fn()
            dt = (time.thread_time_ns() - t0) / calls / 1000
            best[name] = min(best[name], dt)
    return best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--peers", type=int, nargs="*", default=[1, 1000])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model directory")
    args = ap.parse_args(argv)
    macs = forecaster_macs(args.model / "forecaster.onnx")
    print(f"CPU vector extensions: {' '.join(cpu_vector_flags()) or 'unknown'}")
    for name in ("forecaster", "allocator"):
        path = args.model / f"{name}.onnx"
        print(f"{name}: {optimised_nodes(path)} nodes run at batch 1 after optimisation")
    for k in args.peers:
        calls = max(1, args.calls // k) if k > 1 else args.calls
        res = time_pieces(pieces(k, args.model), args.rounds, max(calls, 5))
        print(f"k={k}: thread CPU us per call (min of {args.rounds} rounds)")
        for name, us in res.items():
            print(f"  {name:32s} {us:10.1f}")
        us = res["  run_forecaster"]
        gflops = 2 * macs * k / us / 1e3
        print(
            f"  forecaster: {macs:,} multiply-adds per window, {gflops:.1f} GFLOP/s,"
            f" {us / k:.1f} us per window: forecasting {k} peer(s) once a second is"
            f" {100 * us / 1e6:.1f}% of a core"
        )


if __name__ == "__main__":
    main()
