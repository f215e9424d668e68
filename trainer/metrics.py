"""Forecast error metrics, per source and macro-averaged over sources.

Every function takes flat arrays over evaluated windows: ``actual`` (the next
step's bandwidth in Mbit/s), a forecast, and ``trace`` (an integer id per
window, so per-trace normalisation is possible). Definitions:

- ``mae``: mean absolute error in Mbit/s, pooled over windows.
- ``mse``: mean squared error in (Mbit/s)^2, pooled over windows.
- ``nmae``: per trace, MAE divided by the mean actual of that trace's windows;
  then averaged over traces (each trace weighs the same). Traces whose mean
  actual is 0 are left out (there is no scale to normalise by). This is
  :func:`bwpredd.accuracy.nmae`, the daemon's and ``bwpredctl replay``'s too.
- ``mape``: mean absolute percentage error (in %) over actuals >= 0.1 Mbit/s.
- ``acc2`` / ``acc10`` / ``acc20``: share of forecasts within 2 / 10 / 20 % of
  the actual, on raw Mbit/s (``|f - a| <= p * a``).
- ``coverage``: share of actuals inside ``[low, high]``.
- ``rel_width``: interval width divided by the trace's mean actual, averaged
  per trace and then over traces (the same normaliser as ``nmae``).

:func:`macro` averages per-source results so each source weighs the same.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from bwpredd.accuracy import nmae

__all__ = [
    "MAPE_MIN_MBPS",
    "POINT_METRICS",
    "interval_metrics",
    "macro",
    "point_metrics",
    "score",
]

F = npt.NDArray[np.floating]
I = npt.NDArray[np.integer]  # noqa: E741

# Below this an actual says "outage", not "a rate": percentage errors explode.
MAPE_MIN_MBPS = 0.1
POINT_METRICS = ("mae", "mse", "nmae", "mape", "acc2", "acc10", "acc20")


def _per_trace_mean(values: F, trace: I) -> tuple[I, F]:
    """Trace ids and the mean of ``values`` over each trace's windows."""
    ids, inv = np.unique(trace, return_inverse=True)
    sums = np.bincount(inv, weights=values)
    counts = np.bincount(inv)
    return ids, sums / counts


def _normalised(values: F, actual: F, trace: I) -> float:
    """Per trace mean(values) / mean(actual), averaged over traces with a
    scale: :func:`bwpredd.accuracy.nmae` when ``values`` are absolute errors,
    the relative interval width when they are widths."""
    _, num = _per_trace_mean(values, trace)
    _, den = _per_trace_mean(actual, trace)
    return nmae(num, den)


def point_metrics(pred: F, actual: F, trace: I) -> dict[str, float]:
    """Point-forecast metrics (see the module docstring).

    Args:
        pred: ``[N]`` forecasts in Mbit/s.
        actual: ``[N]`` actual next-step bandwidth in Mbit/s.
        trace: ``[N]`` trace id of each window.
    """
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    trace = np.asarray(trace).reshape(-1)
    if not len(pred) == len(actual) == len(trace):
        raise ValueError("pred, actual and trace must have the same length")
    if len(pred) == 0:
        raise ValueError("no windows to score")
    err = np.abs(pred - actual)
    big = actual >= MAPE_MIN_MBPS
    mape = float(np.mean(err[big] / actual[big]) * 100.0) if big.any() else float("nan")
    out = {
        "mae": float(err.mean()),
        "mse": float(np.mean(err**2)),
        "nmae": _normalised(err, actual, trace),
        "mape": mape,
    }
    for pct in (2, 10, 20):
        out[f"acc{pct}"] = float(np.mean(err <= pct / 100.0 * actual))
    return out


def interval_metrics(low: F, high: F, actual: F, trace: I) -> dict[str, float]:
    """Coverage and mean relative width of an interval forecast.

    Args:
        low: ``[N]`` lower bounds in Mbit/s.
        high: ``[N]`` upper bounds in Mbit/s.
        actual: ``[N]`` actual next-step bandwidth in Mbit/s.
        trace: ``[N]`` trace id of each window.
    """
    low = np.asarray(low, dtype=np.float64).reshape(-1)
    high = np.asarray(high, dtype=np.float64).reshape(-1)
    actual = np.asarray(actual, dtype=np.float64).reshape(-1)
    trace = np.asarray(trace).reshape(-1)
    inside = (actual >= low) & (actual <= high)
    return {
        "coverage": float(inside.mean()),
        "rel_width": _normalised(high - low, actual, trace),
    }


def score(
    actual: F,
    trace: I,
    point: F,
    low: F | None = None,
    high: F | None = None,
) -> dict[str, float]:
    """All metrics of one forecaster on one set of windows.

    Args:
        actual: ``[N]`` actual next-step bandwidth in Mbit/s.
        trace: ``[N]`` trace id of each window.
        point: ``[N]`` point forecasts.
        low: ``[N]`` interval lower bounds, or None (no interval metrics).
        high: ``[N]`` interval upper bounds, or None.
    """
    out = point_metrics(point, actual, trace)
    if low is not None and high is not None:
        out.update(interval_metrics(low, high, actual, trace))
    out["n_windows"] = len(actual)
    out["n_traces"] = len(np.unique(trace))
    return out


def macro(per_source: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Average each metric over sources (each source weighs the same).

    Args:
        per_source: ``{source: {metric: value}}`` for one forecaster.

    Returns:
        ``{metric: mean over the sources that have it}``; counts are summed.
    """
    keys: list[str] = []
    for metrics in per_source.values():
        keys.extend(k for k in metrics if k not in keys)
    out: dict[str, float] = {}
    for key in keys:
        values = [m[key] for m in per_source.values() if key in m]
        if key in ("n_windows", "n_traces"):
            out[key] = float(sum(values))
        else:
            finite = [v for v in values if np.isfinite(v)]
            out[key] = float(np.mean(finite)) if finite else float("nan")
    out["n_sources"] = float(len(per_source))
    return out
