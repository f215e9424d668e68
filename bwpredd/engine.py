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

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt

from bwpredd import baselines
from bwpredd.modeldir import LoadedModel
from bwpredd.schema import default_vector
from bwpredd.state import LEVELS, build_state, reference_capacity
from bwpredd.transfer import HorizonCurves

__all__ = [
    "FALLBACK_DEFAULTS",
    "SOURCE_LABELS",
    "Allocations",
    "Engine",
    "Forecasts",
    "LoadedModel",
    "Source",
    "edge_pad",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
# Feature defaults when no model (and so no manifest) is loaded.
FALLBACK_DEFAULTS: tuple[float, ...] = default_vector()
# Baseline point forecast: EWMA with alpha 0.5 was within a hair of the best
# simple baseline (last value) on the developer traces and is steadier.
BASELINE_ALPHA = 0.5


class Source(IntEnum):
    """Where an answer came from: bwpredd's one definition of the forecast
    source. Names and values are ``bwpred.v1.ForecastSource``'s without its
    prefix (a test checks), so the servicer sends them as they are; metrics
    and replay reports name them by :attr:`label`."""

    MODEL = 1
    BASELINE_COLD_START = 2
    BASELINE_FALLBACK = 3

    @property
    def label(self) -> str:
        """The lower-case name (``baseline_cold_start``): metric label values
        and report keys."""
        return self.name.lower()


# Plain ints of the sources for array work (an IntEnum operand costs a
# Python-level conversion per NumPy call).
_MODEL = int(Source.MODEL)
_COLD_START = int(Source.BASELINE_COLD_START)
_FALLBACK = int(Source.BASELINE_FALLBACK)

# Source value -> label, for code that holds plain ints (answers, the wire).
SOURCE_LABELS: dict[int, str] = {s.value: s.label for s in Source}


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
        return self._model.manifest.feature_default_vector()

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        """Serve ``model`` from now on; return the previous one."""
        old, self._model = self._model, model
        return old

    def forecast(
        self, windows: F32, counts: I64, force_baseline: npt.NDArray[np.bool_] | None = None
    ) -> Forecasts:
        """Forecast ``k`` peers.

        Args:
            windows: ``[k, W, WIDTH]`` oldest first (padding rows before the real ones).
            counts: ``[k]`` real rows per window.
            force_baseline: ``[k]`` peers to answer from the baseline
                (``BASELINE_FALLBACK``) even with a model, e.g. the guardrail.
        """
        model = self._model  # one read: the whole call uses one model
        k = len(windows)
        full = counts >= windows.shape[1]
        all_full = bool(full.all())
        # Full windows weigh all their rows: no per-window counts to look up.
        base = baselines.ewma(windows, None if all_full else counts, BASELINE_ALPHA)
        version = model.version if model else ""
        if model is not None and all_full and k:
            # The common case (every peer past cold start): the model answers
            # all of them unless an output is not finite or the guardrail
            # says no, and then the general path below takes over.
            p, lo, hi = model.run_forecaster(np.ascontiguousarray(windows, dtype=np.float32))
            if (force_baseline is None or not force_baseline.any()) and bool(
                np.isfinite(p).all() & np.isfinite(lo).all() & np.isfinite(hi).all()
            ):
                return Forecasts(
                    p.copy(),
                    np.minimum(lo, p),
                    np.maximum(hi, p),
                    np.full(k, _MODEL, dtype=np.int8),
                    base,
                    p.copy(),
                    counts,
                    version,
                )
            outputs: tuple[F32, F32, F32] | None = (p, lo, hi)
        else:
            outputs = None
        point = base.copy()
        low = np.empty(k, dtype=np.float32)
        high = np.empty(k, dtype=np.float32)
        source = np.where(full, _FALLBACK, _COLD_START).astype(np.int8)
        model_point = np.full(k, np.nan, dtype=np.float32)
        served = np.zeros(k, dtype=np.bool_)
        # The model runs on every full window, even those the guardrail
        # answers from the baseline: live scoring must see it win again.
        if model is not None and (all_full or full.any()):
            sel = np.flatnonzero(full)
            if outputs is None:
                batch = windows if sel.size == k else windows[sel]
                outputs = model.run_forecaster(np.ascontiguousarray(batch, dtype=np.float32))
            p, lo, hi = outputs
            ok = np.isfinite(p) & np.isfinite(lo) & np.isfinite(hi)
            model_point[sel[ok]] = p[ok]
            if force_baseline is not None:
                ok &= ~force_baseline[sel]
            sel, p, lo, hi = sel[ok], p[ok], lo[ok], hi[ok]
            point[sel], low[sel], high[sel] = p, np.minimum(lo, p), np.maximum(hi, p)
            source[sel] = _MODEL
            served[sel] = True
        if not served.all():
            rest = np.flatnonzero(~served)
            low[rest], high[rest] = baselines.baseline_interval(
                windows[rest], base[rest], counts[rest]
            )
        return Forecasts(point, low, high, source, base, model_point, counts, version)

    def horizon_curves(self, windows: F32, step_s: F32 | float) -> HorizonCurves | None:
        """Horizon forecasts of full windows (:mod:`bwpredd.transfer`), or
        None when no model, or one that declares no horizons, is loaded.

        Args:
            windows: ``[k, W, WIDTH]`` full windows, oldest first.
            step_s: ``[k]`` (or one) seconds between samples.
        """
        model = self._model  # one read: the whole call uses one model
        if model is None or model.horizon is None:
            return None
        step = np.broadcast_to(np.asarray(step_s, np.float32), (len(windows),))
        mean, low, high = model.run_horizon(np.ascontiguousarray(windows, dtype=np.float32), step)
        return HorizonCurves.from_outputs(model.manifest.horizons, mean, low, high)

    def allocate(
        self, windows: F32, counts: I64, fc: Forecasts, step_s: F32 | float
    ) -> Allocations:
        """Greedy allocation levels for ``k`` peers from their forecasts.

        Peers the model forecast get the Q-network's argmax on the state
        built by :func:`bwpredd.state.build_state`; the others get the level
        nearest forecast / capacity (the forecast-following heuristic).

        Args:
            windows: ``[k, W, WIDTH]`` oldest first.
            counts: ``[k]`` real rows per window.
            fc: :meth:`forecast` of the same windows.
            step_s: ``[k]`` (or one) seconds between samples
                (:func:`bwpredd.state.step_seconds`).
        """
        model = self._model
        full_windows = edge_pad(windows, counts)
        cap = reference_capacity(full_windows)
        use = fc.source == _MODEL
        if model is not None and use.size and bool(use.all()):
            # Every peer from the model: no heuristic to compute and discard,
            # no rows to select.
            step = np.asarray(step_s, np.float32)
            states = build_state(full_windows, fc.point, fc.low, fc.high, step, cap)
            return Allocations(model.run_allocator(states), cap, fc.source, fc)
        # The forecast-following heuristic (np.clip's answer, written out).
        level = np.rint(fc.point / cap * 10) - 1
        action = np.minimum(np.maximum(level, 0), 9).astype(np.int64)
        if model is not None and use.any():
            sel = np.flatnonzero(use)
            step = np.broadcast_to(np.asarray(step_s, np.float32), cap.shape)[sel]
            states = build_state(
                full_windows[sel], fc.point[sel], fc.low[sel], fc.high[sel], step, cap[sel]
            )
            action[sel] = model.run_allocator(states)
        return Allocations(action, cap, fc.source, fc)
