"""Why ONNX: the shipped forecaster through onnxruntime against torch eager.

Runs in a spawned child process, so torch stays out of the processes whose
speed the rest of the bench measures; torch, onnx and the trainer are
imported there, after the onnxruntime figures are taken, and their import
time and memory are part of what is reported.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.harness import rss_kib, synthetic_windows
from bench.load import latency_summary, ratio
from bwpredd.manifest import FORECASTER_INPUT, FORECASTER_OUTPUTS
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model

__all__ = ["onnx_vs_torch"]

F32 = npt.NDArray[np.float32]


def _onnx_vs_torch_worker(threads: int, reps_1: int, reps_1000: int, results: Any) -> None:
    try:
        results.put(_onnx_vs_torch(threads, reps_1, reps_1000))
    except Exception as exc:
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _time_fn(fn: Callable[[], object], reps: int, warmup: int) -> npt.NDArray[np.int64]:
    for _ in range(warmup):
        fn()
    out = np.empty(reps, dtype=np.int64)
    for i in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return out


def _onnx_vs_torch(threads: int, reps_1: int, reps_1000: int) -> dict[str, Any]:
    pid = os.getpid()
    base_kb = rss_kib(pid)
    t0 = time.perf_counter()
    model = load_model(DEFAULT_MODEL_DIR, threads)
    ort_load_s = time.perf_counter() - t0
    ort_kb = rss_kib(pid)
    t0 = time.perf_counter()
    try:
        import onnx
        import torch

        from trainer.models.forecaster import Forecaster, ForecasterConfig
    except ImportError as exc:
        return {"skipped": f"torch or trainer not importable ({exc}); install the train extra"}
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # As many networks as the shipped graph holds (each has one LSTM node
    # per layer), so both sides compute the same thing.
    graph = onnx.load(str(DEFAULT_MODEL_DIR / model.manifest.forecaster.file))
    layers = len(ForecasterConfig().lstm_sizes)
    lstms = sum(node.op_type == "LSTM" for node in graph.graph.node)
    cfg = ForecasterConfig(residual=True, members=max(1, lstms // layers))
    net = Forecaster(cfg).eval()
    torch_load_s = time.perf_counter() - t0
    torch_kb = rss_kib(pid)
    windows = synthetic_windows(1000, seed=7)
    names = list(FORECASTER_OUTPUTS)
    out: dict[str, Any] = {
        "threads": threads,
        "architecture": str(cfg),
        "ort_import_and_load_s": round(ort_load_s, 3),
        "torch_import_and_build_s": round(torch_load_s, 3),
        "ort_rss_mb": round((ort_kb - base_kb) / 1024, 1),
        "torch_extra_rss_mb": round((torch_kb - ort_kb) / 1024, 1),
    }
    for batch, reps in ((1, reps_1), (1000, reps_1000)):
        w = np.ascontiguousarray(windows[:batch])
        tw = torch.from_numpy(w)
        sess = model.forecaster

        def ort_run(sess: Any = sess, w: F32 = w) -> object:
            return sess.run(names, {FORECASTER_INPUT: w})

        def torch_run(tw: Any = tw) -> object:
            with torch.inference_mode():
                return net(tw)

        o = _time_fn(ort_run, reps, warmup=max(3, reps // 10))
        t = _time_fn(torch_run, reps, warmup=max(3, reps // 10))
        out[f"batch_{batch}"] = {
            "onnxruntime": latency_summary(o),
            "torch_eager": latency_summary(t),
            "torch_over_ort_p50": ratio(float(np.median(t)), float(np.median(o))),
        }
    return out


def onnx_vs_torch(threads: int, reps_1: int, reps_1000: int) -> dict[str, Any]:
    """Forecaster through onnxruntime vs torch eager, in a spawned child."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    p = ctx.Process(target=_onnx_vs_torch_worker, args=(threads, reps_1, reps_1000, results))
    p.start()
    out: dict[str, Any] = results.get(timeout=300)
    p.join(timeout=30)
    return out
