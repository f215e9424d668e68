"""Engine: the models behind Forecast and Allocate, on onnxruntime.

A :class:`LoadedModel` is immutable: its sessions are built from the bytes
whose sha256 was checked against the manifest, warmed up and smoke-tested
before anyone sees it. The :class:`Engine` holds one reference to the current
model; a reload builds the new one completely and then swaps that reference,
so calls in flight finish on the model they started with and a failed reload
leaves the old model serving. Peers with fewer than ``W`` samples, or with no
usable model, are answered by the baselines.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# onnxruntime phones home (a device-id database and an events endpoint)
# unless told not to before it loads; a sidecar must not.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from bwpredd import baselines
from bwpredd.errors import ManifestError, ModelError
from bwpredd.manifest import (
    ALLOCATOR_INPUT,
    ALLOCATOR_OUTPUT,
    FEATURES,
    FORECASTER_INPUT,
    FORECASTER_OUTPUTS,
    WINDOW,
    Manifest,
    load_manifest,
    verify_files,
)
from bwpredd.state import (
    DEFAULT_STEP_S,
    LEVELS,
    STATE_LAYOUT,
    build_state,
    reference_capacity,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "FALLBACK_DEFAULTS",
    "Allocations",
    "Engine",
    "Forecasts",
    "LoadedModel",
    "Source",
    "edge_pad",
    "load_model",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
# Feature defaults when no model (and so no manifest) is loaded.
FALLBACK_DEFAULTS: tuple[float, float, float, float] = (50.0, 0.0, 0.0, 1.0)
# Baseline point forecast: EWMA with alpha 0.5 was within a hair of the best
# simple baseline (last value) on the developer traces and is steadier.
BASELINE_ALPHA = 0.5


class Source(IntEnum):
    """Where an answer came from; values match ``bwpred.v1.ForecastSource``."""

    MODEL = 1
    BASELINE_COLD_START = 2
    BASELINE_FALLBACK = 3


@dataclass(frozen=True)
class Forecasts:
    """Forecasts for ``k`` peers (Mbit/s)."""

    point: F32
    low: F32
    high: F32
    source: npt.NDArray[np.int8]
    baseline: F32  # the EWMA baseline's point, for live scoring
    model_point: F32  # the model's point (NaN where it did not run), ditto
    counts: I64  # real samples in each window
    model_version: str


@dataclass(frozen=True)
class Allocations:
    """Allocation decisions for ``k`` peers."""

    action: I64
    capacity: F32  # reference capacity, Mbit/s
    source: npt.NDArray[np.int8]
    forecasts: Forecasts

    @property
    def percent(self) -> I64:
        return (self.action + 1) * 10

    @property
    def allocated_mbps(self) -> F32:
        return (np.asarray(LEVELS, dtype=np.float32)[self.action] * self.capacity).astype(
            np.float32
        )


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed-up model directory."""

    manifest: Manifest
    path: Path
    forecaster: ort.InferenceSession
    allocator: ort.InferenceSession
    load_seconds: float
    sha256: dict[str, str] = field(default_factory=dict)

    @property
    def version(self) -> str:
        return self.manifest.version

    def run_forecaster(self, windows: F32) -> tuple[F32, F32, F32]:
        """Point, low, high ``[k]`` for full windows ``[k, W, 4]``."""
        out = self.forecaster.run(list(FORECASTER_OUTPUTS), {FORECASTER_INPUT: windows})
        return out[0][:, 0], out[1][:, 0], out[2][:, 0]

    def run_allocator(self, states: F32) -> I64:
        """Greedy actions ``[k]`` for states ``[k, S]``: argmax, never random."""
        (q,) = self.allocator.run([ALLOCATOR_OUTPUT], {ALLOCATOR_INPUT: states})
        actions: I64 = np.argmax(q, axis=1).astype(np.int64)
        return actions


def _session(data: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A sidecar must not burn a core spinning between calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


def _check_bound(sess: ort.InferenceSession, spec: Any, what: str) -> None:
    """The session's I/O names and static dims must match the manifest."""
    for kind, actual, expected in (
        ("inputs", sess.get_inputs(), spec.inputs),
        ("outputs", sess.get_outputs(), spec.outputs),
    ):
        got = {t.name: t.shape for t in actual}
        for t in expected:
            if t.name not in got:
                raise ModelError(f"{what}: {kind} lack {t.name!r} (has {sorted(got)})")
            shape = got[t.name]
            if len(shape) != len(t.shape) or any(
                isinstance(a, int) and e is not None and a != e
                for a, e in zip(shape, t.shape, strict=True)
            ):
                raise ModelError(
                    f"{what}: {t.name} has shape {shape}, manifest says {list(t.shape)}"
                )


def smoke_windows(n: int = 8) -> F32:
    """A fixed batch of plausible windows spanning four orders of magnitude."""
    rng = np.random.default_rng(0)
    scale = np.logspace(-1, 4, n)[:, None]
    bw = scale * np.exp(rng.normal(0, 0.3, size=(n, WINDOW)))
    w = np.empty((n, WINDOW, len(FEATURES)), dtype=np.float32)
    w[:, :, 0] = rng.uniform(0.2, 150, size=(n, 1))
    w[:, :, 1] = bw
    w[:, :, 2] = rng.uniform(0, 0.02, size=(n, WINDOW))
    w[:, :, 3] = rng.uniform(0.95, 1, size=(n, WINDOW))
    return w


def load_model(model_dir: Path, threads: int = 1) -> LoadedModel:
    """Verify, load, warm up and smoke-test a model directory.

    Args:
        model_dir: a directory with ``manifest.json`` and the ONNX files.
        threads: onnxruntime intra-op threads per session.

    Raises:
        ModelError: any check failed, or anything else went wrong; the
            message says which and why.
    """
    try:
        return _load_model(model_dir, threads)
    except ModelError:
        raise
    except Exception as exc:  # a directory no check foresaw is a refused load, never a crash
        raise ModelError(f"{model_dir}: cannot load: {type(exc).__name__}: {exc}") from exc


def _load_model(model_dir: Path, threads: int) -> LoadedModel:
    start = time.perf_counter()
    try:
        manifest = load_manifest(model_dir)
        blobs = verify_files(model_dir, manifest)
    except ManifestError as exc:
        raise ModelError(f"{model_dir}: {exc}") from None
    if manifest.state_layout != STATE_LAYOUT:
        # Same width in another order would run, and allocate from misread states.
        raise ModelError(
            f"{model_dir}: state_layout: the allocator was trained on "
            f"{list(manifest.state_layout)}, this bwpredd builds {list(STATE_LAYOUT)}; "
            "export the model again with this version"
        )
    try:
        fsess = _session(blobs[manifest.forecaster.file], threads)
        asess = _session(blobs[manifest.allocator.file], threads)
    except Exception as exc:  # onnxruntime raises its own types for bad graphs
        raise ModelError(f"{model_dir}: onnxruntime cannot load the model: {exc}") from None
    _check_bound(fsess, manifest.forecaster, "forecaster")
    _check_bound(asess, manifest.allocator, "allocator")
    model = LoadedModel(
        manifest=manifest,
        path=model_dir,
        forecaster=fsess,
        allocator=asess,
        load_seconds=0.0,
        sha256={m.file: m.sha256 for m in (manifest.forecaster, manifest.allocator)},
    )
    # Smoke test (also the warm-up: first runs allocate and plan).
    windows = smoke_windows()
    try:
        for batch in (windows[:1], windows):
            point, low, high = model.run_forecaster(batch)
            states = build_state(batch, point, low, high, DEFAULT_STEP_S)
            actions = model.run_allocator(states)
    except Exception as exc:
        raise ModelError(f"{model_dir}: smoke inference failed: {exc}") from None
    if not (np.isfinite(point).all() and np.isfinite(low).all() and np.isfinite(high).all()):
        raise ModelError(f"{model_dir}: smoke inference gave non-finite forecasts")
    tol = 1e-3 * np.maximum(np.abs(point), 1e-3)
    if not ((low <= point + tol).all() and (point <= high + tol).all()):
        raise ModelError(f"{model_dir}: smoke inference gave low > point or point > high")
    if actions.shape != (len(windows),) or not ((actions >= 0) & (actions < 10)).all():
        raise ModelError(f"{model_dir}: smoke inference gave actions outside 0-9")
    return LoadedModel(
        manifest=manifest,
        path=model_dir,
        forecaster=fsess,
        allocator=asess,
        load_seconds=time.perf_counter() - start,
        sha256=model.sha256,
    )


def edge_pad(windows: F32, counts: I64) -> F32:
    """Fill each window's padding rows with its oldest real row, so code that
    needs full windows (capacity, state) sees plausible values."""
    w = windows.shape[1]
    if (counts >= w).all():
        return windows
    first = np.clip(w - counts, 0, w - 1)
    idx = np.maximum(np.arange(w)[None, :], first[:, None])
    padded: F32 = windows[np.arange(len(windows))[:, None], idx]
    return padded


class Engine:
    """Answers forecasts and allocations from the current model or the
    baselines. Swapping the model is one reference assignment.

    Args:
        model: the model to start with, or None (baselines only).
    """

    def __init__(self, model: LoadedModel | None = None) -> None:
        self._model = model

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    @property
    def version(self) -> str:
        return self._model.version if self._model else ""

    @property
    def feature_defaults(self) -> tuple[float, ...]:
        """Feature defaults in feature order (bandwidth's is unused)."""
        if self._model is None:
            return FALLBACK_DEFAULTS
        return tuple(self._model.manifest.feature_default_vector())

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` from now on; return the previous one."""
        old, self._model = self._model, model
        return old

    def forecast(
        self, windows: F32, counts: I64, force_baseline: npt.NDArray[np.bool_] | None = None
    ) -> Forecasts:
        """Forecast ``k`` peers.

        Args:
            windows: ``[k, W, 4]`` oldest first (padding rows before the real ones).
            counts: ``[k]`` real rows per window.
            force_baseline: ``[k]`` peers to answer from the baseline
                (``BASELINE_FALLBACK``) even with a model, e.g. the guardrail.
        """
        model = self._model  # one read: the whole call uses one model
        k = len(windows)
        base = baselines.ewma(windows, counts, BASELINE_ALPHA)
        point = base.copy()
        low = np.empty(k, dtype=np.float32)
        high = np.empty(k, dtype=np.float32)
        full = counts >= windows.shape[1]
        source = np.where(full, Source.BASELINE_FALLBACK, Source.BASELINE_COLD_START).astype(
            np.int8
        )
        model_point = np.full(k, np.nan, dtype=np.float32)
        served = np.zeros(k, dtype=np.bool_)
        # The model runs on every full window, even those the guardrail
        # answers from the baseline: live scoring must see it win again.
        if model is not None and full.any():
            sel = np.flatnonzero(full)
            batch = windows if sel.size == k else windows[sel]
            p, lo, hi = model.run_forecaster(np.ascontiguousarray(batch, dtype=np.float32))
            ok = np.isfinite(p) & np.isfinite(lo) & np.isfinite(hi)
            model_point[sel[ok]] = p[ok]
            if force_baseline is not None:
                ok &= ~force_baseline[sel]
            sel, p, lo, hi = sel[ok], p[ok], lo[ok], hi[ok]
            point[sel], low[sel], high[sel] = p, np.minimum(lo, p), np.maximum(hi, p)
            source[sel] = Source.MODEL
            served[sel] = True
        if not served.all():
            rest = np.flatnonzero(~served)
            low[rest], high[rest] = baselines.baseline_interval(
                windows[rest], base[rest], counts[rest]
            )
        return Forecasts(
            point, low, high, source, base, model_point, counts, model.version if model else ""
        )

    def allocate(
        self, windows: F32, counts: I64, fc: Forecasts, step_s: F32 | float
    ) -> Allocations:
        """Greedy allocation levels for ``k`` peers from their forecasts.

        Peers the model forecast get the Q-network's argmax on the state
        built by :func:`bwpredd.state.build_state`; the others get the level
        nearest forecast / capacity (the forecast-following heuristic).

        Args:
            windows: ``[k, W, 4]`` oldest first.
            counts: ``[k]`` real rows per window.
            fc: :meth:`forecast` of the same windows.
            step_s: ``[k]`` (or one) seconds between samples
                (:func:`bwpredd.state.step_seconds`).
        """
        model = self._model
        full_windows = edge_pad(windows, counts)
        cap = reference_capacity(full_windows)
        action = np.clip(np.rint(fc.point / cap * 10) - 1, 0, 9).astype(np.int64)
        use = fc.source == Source.MODEL
        if model is not None and use.any():
            sel = np.flatnonzero(use)
            step = np.broadcast_to(np.asarray(step_s, np.float32), cap.shape)[sel]
            states = build_state(
                full_windows[sel], fc.point[sel], fc.low[sel], fc.high[sel], step, cap[sel]
            )
            action[sel] = model.run_allocator(states)
        return Allocations(action, cap, fc.source, fc)
