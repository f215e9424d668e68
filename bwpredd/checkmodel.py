"""Validate a model directory offline (``bwpredd check-model DIR``).

The checks, in order, each stopping at the first failure: the manifest
schema; each file's sha256; both graphs load in onnxruntime from the very
bytes that were verified; their input and output names, dtypes and shapes
match the manifest; and a smoke inference on a synthetic batch spanning four
orders of magnitude of bandwidth gives finite forecasts with ``low <= point
<= high`` and finite ``q_values`` ``[N, 10]`` on states built exactly as the
daemon builds them. Imports only onnxruntime, numpy, the standard library and
``bwpredd``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from bwpredd.errors import ManifestError
from bwpredd.manifest import (
    ALLOCATOR_INPUT,
    ALLOCATOR_OUTPUT,
    FEATURES,
    FORECASTER_INPUT,
    FORECASTER_OUTPUTS,
    N_ACTIONS,
    WINDOW,
    Manifest,
    ModelFile,
    TensorSpec,
    load_manifest,
    verify_files,
)
from bwpredd.state import DEFAULT_STEP_S, build_state

__all__ = ["EXIT_INVALID", "EXIT_OK", "CheckResult", "check_model_dir", "main", "smoke_windows"]

EXIT_OK = 0
EXIT_INVALID = 1
F32 = npt.NDArray[np.float32]
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}
# Point forecasts may exceed the interval by float rounding only.
_ORDER_SLACK = 1e-5


@dataclass
class CheckResult:
    """The outcome of :func:`check_model_dir`: ok, or the first reason it is not."""

    ok: bool
    path: Path
    reason: str = ""
    version: str = ""
    files: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a terminal: OK with version, files and timings, or the reason."""
        if not self.ok:
            return f"FAIL {self.path}: {self.reason}"
        files = ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in self.files.items())
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings_ms.items())
        return f"OK {self.path}: version {self.version}; {files}; {times}"


def smoke_windows(n: int = 64, seed: int = 0) -> F32:
    """Seeded raw windows ``[n, 10, 4]``: bandwidth from 0.05 Mbit/s to 10 Gbit/s,
    with an all-zero window (an outage) and a constant one among them.

    Args:
        n: how many windows (at least 2).
        seed: the generator's seed.
    """
    rng = np.random.default_rng(seed)
    level = np.exp(np.linspace(np.log(0.05), np.log(10_000.0), n))[:, None]
    bw = level * np.exp(np.cumsum(rng.normal(0.0, 0.2, size=(n, WINDOW)), axis=1))
    lat = np.exp(rng.uniform(0.0, 5.0, size=(n, 1))) * (1 + rng.random((n, WINDOW)) * 0.3)
    loss = rng.uniform(0.0, 0.05, size=(n, WINDOW))
    rel = rng.uniform(0.9, 1.0, size=(n, WINDOW))
    bw[0] = 0.0
    bw[1] = 25.0
    return np.stack([lat, bw, loss, rel], axis=2).astype(np.float32)


def check_model_dir(path: Path) -> CheckResult:
    """Validate a model directory without torch.

    Args:
        path: the model directory (holding ``manifest.json``).

    Returns:
        ``ok=True`` with the version, file sizes and load/inference timings,
        or ``ok=False`` with the first failure as ``reason``.
    """
    path = Path(path)
    result = CheckResult(ok=False, path=path)
    timings: dict[str, float] = {}
    try:
        manifest = load_manifest(path)
        result.version = manifest.version
        blobs = verify_files(path, manifest)
        result.files = {name: len(data) for name, data in blobs.items()}
        t0 = time.perf_counter()
        sessions = {
            which: _session(blobs[spec.file], spec.file)
            for which, spec in (
                ("forecaster", manifest.forecaster),
                ("allocator", manifest.allocator),
            )
        }
        timings["load"] = (time.perf_counter() - t0) * 1e3
        _check_io(sessions["forecaster"], manifest.forecaster)
        _check_io(sessions["allocator"], manifest.allocator)
        _smoke(sessions["forecaster"], sessions["allocator"], manifest, timings)
    except (ManifestError, _CheckError) as exc:
        result.reason = str(exc)
        return result
    result.ok = True
    result.timings_ms = {k: round(v, 3) for k, v in timings.items()}
    return result


class _CheckError(Exception):
    pass


def _session(data: bytes, name: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _CheckError(f"{name}: onnxruntime cannot load it: {first}") from None


def _check_io(sess: ort.InferenceSession, spec: ModelFile) -> None:
    for kind, got, want in (
        ("inputs", sess.get_inputs(), spec.inputs),
        ("outputs", sess.get_outputs(), spec.outputs),
    ):
        got_names = [a.name for a in got]
        want_names = [t.name for t in want]
        if got_names != want_names:
            raise _CheckError(
                f"{spec.file}: {kind} are {got_names}, the manifest says {want_names}"
            )
        for arg, t in zip(got, want, strict=True):
            _check_tensor(spec.file, arg, t)


def _check_tensor(file: str, arg: Any, spec: TensorSpec) -> None:
    dtype = _ORT_DTYPES.get(str(arg.type), str(arg.type))
    if dtype != spec.dtype:
        raise _CheckError(f"{file}: {spec.name} is {dtype}, the manifest says {spec.dtype}")
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    if shape != spec.shape:
        raise _CheckError(
            f"{file}: {spec.name} has shape {_fmt(shape)}, the manifest says {_fmt(spec.shape)}"
        )


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _smoke(
    forecaster: ort.InferenceSession,
    allocator: ort.InferenceSession,
    manifest: Manifest,
    timings: dict[str, float],
) -> None:
    windows = smoke_windows()
    n = len(windows)
    t0 = time.perf_counter()
    outs = forecaster.run(list(FORECASTER_OUTPUTS), {FORECASTER_INPUT: windows})
    timings[f"forecast_batch{n}"] = (time.perf_counter() - t0) * 1e3
    arrays: list[F32] = []
    for name, out in zip(FORECASTER_OUTPUTS, outs, strict=True):
        arr = np.asarray(out)
        if arr.shape != (n, 1) or arr.dtype != np.float32:
            raise _CheckError(
                f"smoke: {name} came out {arr.dtype}{list(arr.shape)}, want float32[{n}, 1]"
            )
        if not np.isfinite(arr).all():
            raise _CheckError(f"smoke: {name} is not finite for {int((~np.isfinite(arr)).sum())}")
        arrays.append(arr[:, 0])
    point, low, high = arrays
    slack = _ORDER_SLACK * np.maximum(np.abs(point), 1.0)
    bad = (low > point + slack) | (point > high + slack)
    if bad.any():
        i = int(np.argmax(bad))
        raise _CheckError(
            f"smoke: interval out of order on {int(bad.sum())} of {n} windows "
            f"(e.g. low {low[i]:.4g}, point {point[i]:.4g}, high {high[i]:.4g})"
        )
    states = build_state(windows, point, low, high, DEFAULT_STEP_S)
    if states.shape[1] != len(manifest.state_layout):
        raise _CheckError(
            f"smoke: bwpredd builds states of {states.shape[1]} columns, "
            f"the manifest's state_layout has {len(manifest.state_layout)}"
        )
    t0 = time.perf_counter()
    (q,) = allocator.run([ALLOCATOR_OUTPUT], {ALLOCATOR_INPUT: states})
    timings[f"allocate_batch{n}"] = (time.perf_counter() - t0) * 1e3
    q = np.asarray(q)
    if q.shape != (n, N_ACTIONS) or q.dtype != np.float32:
        raise _CheckError(
            f"smoke: q_values came out {q.dtype}{list(q.shape)}, want float32[{n}, {N_ACTIONS}]"
        )
    if not np.isfinite(q).all():
        raise _CheckError("smoke: q_values are not finite")
    assert windows.shape[1:] == (WINDOW, len(FEATURES))


def main(argv: Sequence[str] | None = None) -> int:
    """``bwpredd check-model DIR``: print one line, return 0 if the directory is good.

    Args:
        argv: the arguments after the subcommand (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="bwpredd check-model",
        description="Validate a model directory offline: manifest, sha256, ONNX I/O, smoke run.",
    )
    parser.add_argument("model_dir", type=Path, metavar="DIR", help="the model directory")
    args = parser.parse_args(argv)
    result = check_model_dir(args.model_dir)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
