"""The simple forecasters practitioners use, vectorised over many windows.

Windows are float32 ``[N, W, WIDTH]``, features in the order of
:mod:`bwpredd.schema`, with the newest sample last; ``counts[i]`` says how
many of the last rows of window ``i`` are real (cold-start peers have fewer
than ``W``; the rows before them are padding and never read). Shared by the
daemon (cold start, fallback, live scoring) and the trainer's evaluation, so
both score the same baselines.
"""

from __future__ import annotations

import functools

import numpy as np
import numpy.typing as npt

from bwpredd.schema import BW

__all__ = [
    "HARMONIC_FLOOR_MBPS",
    "Z80",
    "baseline_interval",
    "ewma",
    "harmonic_mean",
    "last_value",
    "mean",
]

F32 = npt.NDArray[np.float32]
# The harmonic mean is undefined at 0: outages are real, so floor at 1 kbit/s.
HARMONIC_FLOOR_MBPS = 1e-3
# Half-width of a central 80% normal interval, in standard deviations.
Z80 = 1.2815516
# Log-scale spread assumed when a window has too few steps to measure one.
DEFAULT_LOG_SIGMA = 0.5


def _counts(windows: F32, counts: npt.NDArray[np.integer] | None) -> npt.NDArray[np.int64]:
    n, w = windows.shape[0], windows.shape[1]
    if counts is None:
        return np.full(n, w, dtype=np.int64)
    # np.clip's answer, without its call overhead.
    return np.minimum(np.maximum(np.asarray(counts, dtype=np.int64), 1), w)


def _valid(
    windows: F32, counts: npt.NDArray[np.integer] | None, last: int
) -> npt.NDArray[np.bool_]:
    """Mask [N, W] of the real rows among the last ``last`` of each window."""
    w = windows.shape[1]
    c = np.minimum(_counts(windows, counts), last)
    mask: npt.NDArray[np.bool_] = np.arange(w)[None, :] >= (w - c)[:, None]
    return mask


def last_value(windows: F32, counts: npt.NDArray[np.integer] | None = None) -> F32:
    """The newest bandwidth of each window.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last.
        counts: real rows per window (unused: the newest row is always real).
    """
    return windows[:, -1, BW].astype(np.float32)


def mean(windows: F32, counts: npt.NDArray[np.integer] | None = None, last: int = 10) -> F32:
    """Arithmetic mean of the last ``last`` real bandwidths.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last.
        counts: real rows per window; None means all.
        last: how many of the newest samples to average.
    """
    mask = _valid(windows, counts, last)
    bw = np.where(mask, windows[:, :, BW], 0.0)
    out: F32 = (bw.sum(axis=1) / mask.sum(axis=1)).astype(np.float32)
    return out


def harmonic_mean(
    windows: F32, counts: npt.NDArray[np.integer] | None = None, last: int = 5
) -> F32:
    """Harmonic mean of the last ``last`` real bandwidths, each floored at
    :data:`HARMONIC_FLOOR_MBPS` (as MPC and Pensieve use it).

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last.
        counts: real rows per window; None means all.
        last: how many of the newest samples to use.
    """
    mask = _valid(windows, counts, last)
    bw = np.maximum(windows[:, :, BW].astype(np.float64), HARMONIC_FLOOR_MBPS)
    inv = np.where(mask, 1.0 / bw, 0.0)
    out: F32 = (mask.sum(axis=1) / inv.sum(axis=1)).astype(np.float32)
    return out


def ewma(windows: F32, counts: npt.NDArray[np.integer] | None = None, alpha: float = 0.5) -> F32:
    """Exponentially weighted moving average over the real rows, oldest first.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last.
        counts: real rows per window; None means all.
        alpha: weight of each new sample, in (0, 1].
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
    w = windows.shape[1]
    # The recursion unrolled: one weighted sum per window, with the weights
    # of each possible count precomputed (5x faster than stepping in numpy).
    weights = _ewma_weights(w, alpha)[_counts(windows, counts)]
    out: F32 = (weights * windows[:, :, BW]).sum(axis=1, dtype=np.float64).astype(np.float32)
    return out


@functools.lru_cache(maxsize=8)
def _ewma_weights(w: int, alpha: float) -> npt.NDArray[np.float64]:
    """``[w + 1, w]``: row ``c`` weighs the last ``c`` of ``w`` samples as an
    EWMA started at the oldest of them (row 0 is unused)."""
    table = np.zeros((w + 1, w), dtype=np.float64)
    for c in range(1, w + 1):
        first = w - c
        table[c, first] = (1 - alpha) ** (c - 1)
        for t in range(first + 1, w):
            table[c, t] = alpha * (1 - alpha) ** (w - 1 - t)
    table.flags.writeable = False
    return table


def baseline_interval(
    windows: F32, point: F32, counts: npt.NDArray[np.integer] | None = None
) -> tuple[F32, F32]:
    """A nominal 80% interval around a baseline point forecast.

    The spread is the standard deviation of the window's step-to-step log
    changes (floored bandwidth), so it is scale-free; windows with fewer than
    three real samples use :data:`DEFAULT_LOG_SIGMA`.

    Args:
        windows: ``[N, W, WIDTH]`` raw units, newest last.
        point: ``[N]`` point forecasts.
        counts: real rows per window; None means all.

    Returns:
        ``(low, high)``, each ``[N]``, with ``low <= point <= high``.
    """
    mask = _valid(windows, counts, windows.shape[1])
    logbw = np.log(np.maximum(windows[:, :, BW].astype(np.float64), HARMONIC_FLOOR_MBPS))
    diff = np.diff(logbw, axis=1)
    dmask = mask[:, 1:] & mask[:, :-1]
    n = dmask.sum(axis=1)
    safe_n = np.maximum(n, 1)
    mu = np.where(dmask, diff, 0.0).sum(axis=1) / safe_n
    var = np.where(dmask, (diff - mu[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(n - 1, 1)
    sigma = np.where(n >= 2, np.sqrt(var), DEFAULT_LOG_SIGMA)
    p = point.astype(np.float64)
    low = p * np.exp(-Z80 * sigma)
    high = p * np.exp(Z80 * sigma)
    return low.astype(np.float32), high.astype(np.float32)
