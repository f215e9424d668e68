"""The allocator's state: one definition for training and serving.

The Double DQN agent is trained on states built here (``trainer.env``) and
the daemon builds the states it serves from with the same function, so the two
cannot drift. Everything is relative to the link's *reference capacity*, the
90th percentile of the window's bandwidth, which makes the state scale-free:
the same policy serves a 3G phone and a 10 Gbit/s datacenter link. Allocation
levels are fractions of that capacity. Latency enters in two ways: relative to
the window's lowest (a queue building) and, divided by the step length, as the
queue in steps of capacity, the unit the training reward charges it in.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from bwpredd.schema import BW, LAT, LOSS, REL

__all__ = [
    "LEVELS",
    "STATE_LAYOUT",
    "allocation_percent",
    "build_state",
    "reference_capacity",
    "step_seconds",
]

F32 = npt.NDArray[np.float32]
CAPACITY_FLOOR_MBPS = 1e-3
# Action a sends at LEVELS[a] x reference capacity.
LEVELS: tuple[float, ...] = tuple((a + 1) / 10 for a in range(10))

STATE_LAYOUT: tuple[str, ...] = (
    "log1p_latency_ms",  # newest latency, log scale
    "bandwidth_over_capacity",  # newest bandwidth / reference capacity
    "packet_loss",  # newest loss
    "reliability",  # newest reliability
    "forecast_over_capacity",  # forecaster point / capacity
    "low_over_capacity",  # forecaster interval low / capacity
    "high_over_capacity",  # forecaster interval high / capacity
    "mean_over_capacity",  # window mean bandwidth / capacity
    "std_over_capacity",  # window bandwidth std / capacity
    "queue_signal",  # newest latency / window's minimum latency - 1: a queue building
    "latency_trend",  # (newest - previous latency) / window's minimum latency
    "loss_trend",  # newest loss - window mean loss
    "queue_steps",  # (newest - window's minimum latency) / step: the queue, in steps of capacity
    "queue_trend_steps",  # (newest - previous latency) / step
    "min_over_capacity",  # window's lowest bandwidth / capacity
    "median_over_capacity",  # window's median bandwidth / capacity
)
# The state columns divided by the reference capacity.
_OVER_CAP = [i for i, name in enumerate(STATE_LAYOUT) if name.endswith("_over_capacity")]
# A window whose samples share one timestamp has no step length to read.
DEFAULT_STEP_S = 1.0


def allocation_percent(action: int) -> int:
    """The allocation level of an action, in percent: (action + 1) x 10.

    Args:
        action: 0-9.
    """
    if not 0 <= action < len(LEVELS):
        raise ValueError(f"action: must be 0-9, got {action}")
    return (action + 1) * 10


def reference_capacity(windows: F32) -> F32:
    """The 90th percentile of each window's bandwidth, floored at 1 kbit/s.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last, all rows real.
    """
    s = np.sort(windows[:, :, BW].astype(np.float64), axis=1)
    out: F32 = _p90(s).astype(np.float32)
    return out


def _p90(s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The floored 90th percentile of each row of ``s`` (sorted ascending):
    np.percentile's linear interpolation, written out (10x cheaper per call)."""
    pos = 0.9 * (s.shape[1] - 1)
    lo = int(pos)
    hi = min(lo + 1, s.shape[1] - 1)
    p90 = s[:, lo] + (pos - lo) * (s[:, hi] - s[:, lo])
    out: npt.NDArray[np.float64] = np.maximum(p90, CAPACITY_FLOOR_MBPS)
    return out


def step_seconds(timestamps: npt.NDArray[np.float64], counts: npt.NDArray[np.int64]) -> F32:
    """Each window's step length: the median gap between its samples' times.

    Args:
        timestamps: ``[N, W]`` sample times in seconds, oldest first; the
            first ``W - count`` entries of a row are padding.
        counts: ``[N]`` real rows per window.

    Returns:
        ``[N]`` seconds; :data:`DEFAULT_STEP_S` where fewer than two samples
        or no positive gap.
    """
    w = timestamps.shape[1]
    if (counts >= w).all():
        # Every gap real (full windows, the common case): no padding to mask.
        s = np.sort(np.diff(timestamps, axis=1), axis=1)
        med = (s[:, (w - 2) // 2] + s[:, (w - 1) // 2]) / 2
        ok = np.isfinite(med) & (med > 0)
    else:
        # Gap j joins rows j and j + 1; both must be real rows.
        real = np.arange(w - 1)[None, :] >= (w - counts)[:, None]
        # Padding gaps sort last, so the median of a row's n real gaps sits at
        # (n - 1) / 2 (np.nanmedian would do the same at 10x the cost).
        s = np.sort(np.where(real, np.diff(timestamps, axis=1), np.inf), axis=1)
        n = real.sum(axis=1)
        rows = np.arange(len(s))
        med = (s[rows, np.maximum((n - 1) // 2, 0)] + s[rows, n // 2]) / 2
        ok = (n > 0) & np.isfinite(med) & (med > 0)
    out: F32 = np.where(ok, med, DEFAULT_STEP_S).astype(np.float32)
    return out


def build_state(  # noqa: PLR0917 (the state's inputs, in layout order)
    windows: F32,
    point: F32,
    low: F32,
    high: F32,
    step_s: npt.NDArray[np.floating] | float,
    capacity: F32 | None = None,
) -> F32:
    """Allocator states ``[N, len(STATE_LAYOUT)]`` from full windows and the
    forecaster's point and interval.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last, all rows real.
        point: ``[N]`` forecast, Mbit/s.
        low: ``[N]`` interval low end, Mbit/s.
        high: ``[N]`` interval high end, Mbit/s.
        step_s: ``[N]`` (or one) step length in seconds: a standing queue of
            ``q`` steps of the reference capacity adds ``1000 q step_s`` ms
            of latency, so latency over the step length reads the queue in
            the unit the reward charges it.
        capacity: ``[N]`` :func:`reference_capacity` of the windows, if the
            caller has it already.
    """
    w = windows.astype(np.float64)
    n, width = w.shape[0], w.shape[1]
    step_ms = 1000.0 * np.asarray(step_s, np.float64)
    bw = w[:, :, BW]
    lat = w[:, :, LAT]
    # One sort serves the capacity, the minimum and the median: the same
    # arithmetic as np.percentile / np.min / np.median on 10 values, at a
    # fraction of their call overhead.
    s = np.sort(bw, axis=1)
    # The capacity is float32 whether given or computed (as the trainer sees it).
    cap = (_p90(s).astype(np.float32) if capacity is None else capacity).astype(np.float64)
    half = width // 2
    median = s[:, half] if width % 2 else (s[:, half - 1] + s[:, half]) / 2
    # np.mean and np.std written out (the same sums in the same order).
    mean = bw.sum(axis=1, keepdims=True) / width
    dev = bw - mean
    std = np.sqrt((dev * dev).sum(axis=1) / width)
    lat_min = lat.min(axis=1)
    base_lat = np.maximum(lat_min, 1e-3)
    lat_new, lat_prev = lat[:, -1], lat[:, -2]
    state = np.empty((n, len(STATE_LAYOUT)), dtype=np.float64)
    state[:, 0] = np.log1p(lat_new)
    state[:, 1] = bw[:, -1]
    state[:, 2] = w[:, -1, LOSS]
    state[:, 3] = w[:, -1, REL]
    state[:, 4] = point
    state[:, 5] = low
    state[:, 6] = high
    state[:, 7] = mean[:, 0]
    state[:, 8] = std
    state[:, 9] = lat_new / base_lat - 1.0
    state[:, 10] = (lat_new - lat_prev) / base_lat
    state[:, 11] = w[:, -1, LOSS] - w[:, :, LOSS].sum(axis=1) / width
    state[:, 12] = (lat_new - lat_min) / step_ms
    state[:, 13] = (lat_new - lat_prev) / step_ms
    # How far below its capacity the link has been lately: with the
    # mean, std and forecast, the spread a level must leave room for.
    state[:, 14] = s[:, 0]
    state[:, 15] = median
    # Every "/ capacity" column at once.
    state[:, _OVER_CAP] /= cap[:, None]
    # Clip so a pathological window (a 0 after a burst, say) cannot push the
    # network far outside what it was trained on.
    np.minimum(state, 50.0, out=state)
    np.maximum(state, -50.0, out=state)
    out: F32 = state.astype(np.float32)
    return out
