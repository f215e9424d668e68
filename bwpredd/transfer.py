"""Transfer time from horizon forecasts: one job, pure numpy.

A model directory that declares ``horizons`` (seconds ``h_1 < ... < h_H``)
ships a graph giving, per window, the median and the nominal 80% interval
(10th and 90th percentiles) of the **mean bandwidth over the next h
seconds** at each declared horizon: :class:`HorizonCurves`. From them:

**The mean bandwidth over any horizon** (:meth:`HorizonCurves.at`, behind
``ForecastRequest.horizon_seconds``): interpolated linearly in
``(ln h, ln bandwidth)`` between declared horizons; below ``h_1`` the first
horizon's answer, beyond ``h_H`` the last one's (a constant rate past the
largest horizon the model was trained on).

**The time to move a payload** (:meth:`HorizonCurves.seconds`): with
``m_q(h)`` the q-quantile of the mean bandwidth over h, ``C_q(h) = h m_q(h)``
is the q-quantile of the bits delivered by time h, and the time to deliver B
bits is at most t exactly when the bits delivered by t reach B. So the time's
50th percentile solves ``C_0.5(t) = B``, its 10th percentile (the fast end)
``C_0.9(t) = B`` and its 90th percentile (the slow end) ``C_0.1(t) = B``.
``C`` is made non-decreasing in h (a running maximum, so rounding in the
graph can never make a larger payload faster), then inverted by linear
interpolation in ``(ln C, ln h)``; below ``C(h_1)`` at the first horizon's
rate, beyond ``C(h_H)`` at the last horizon's rate. Bandwidths are floored at
:data:`MIN_BW_MBPS` (1 kbit/s), so times stay finite through outages. A
payload of 0 bytes takes 0 s.

**Without horizons** (:func:`next_step_seconds`) the time is today's rule:
payload over the next-step forecast, the interval's ends giving the time's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MIN_BW_MBPS",
    "HorizonCurves",
    "TransferTime",
    "bits_of",
    "next_step_seconds",
]

F64 = npt.NDArray[np.float64]
MIN_BW_MBPS = 1e-3  # the floor bwpredd.advise uses too


def bits_of(payload_bytes: npt.ArrayLike) -> F64:
    """Payload bytes in Mbit (the unit of Mbit/s x seconds)."""
    out: F64 = np.asarray(payload_bytes, dtype=np.float64) * 8.0 / 1e6
    return out


@dataclass(frozen=True)
class TransferTime:
    """Time to move a payload and its nominal 80% interval, in seconds.

    Floats for one window, float64 arrays ``[N]`` for a batch.
    """

    seconds: Any
    low_seconds: Any  # 10th percentile of the time (the fast end)
    high_seconds: Any  # 90th percentile (the slow end)


@dataclass(frozen=True)
class HorizonCurves:
    """Per-window horizon forecasts: median, low, high ``[N, H]`` of the mean
    bandwidth (Mbit/s) over each of ``horizons`` ``[H]`` (seconds)."""

    horizons: F64
    mean: F64
    low: F64
    high: F64

    @classmethod
    def from_outputs(
        cls, horizons: npt.ArrayLike, mean: npt.ArrayLike, low: npt.ArrayLike, high: npt.ArrayLike
    ) -> HorizonCurves:
        """Curves from the horizon graph's outputs, floored and put in order
        (``low <= mean <= high``).

        Args:
            horizons: ``[H]`` seconds, strictly increasing.
            mean: ``[N, H]`` Mbit/s.
            low: ``[N, H]``.
            high: ``[N, H]``.
        """
        m = np.maximum(np.asarray(mean, dtype=np.float64), MIN_BW_MBPS)
        lo = np.minimum(np.maximum(np.asarray(low, dtype=np.float64), MIN_BW_MBPS), m)
        hi = np.maximum(np.asarray(high, dtype=np.float64), m)
        return cls(np.asarray(horizons, dtype=np.float64), m, lo, hi)

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    def take(self, rows: npt.NDArray[np.integer]) -> HorizonCurves:
        """The curves of some rows."""
        return HorizonCurves(self.horizons, self.mean[rows], self.low[rows], self.high[rows])

    def at(self, horizon_s: npt.ArrayLike) -> tuple[F64, F64, F64]:
        """Median, low, high ``[N]`` of the mean bandwidth over ``horizon_s``
        (one value, or ``[N]``), interpolated as the module docstring says.

        Raises:
            ValueError: a horizon that is not finite and > 0.
        """
        h = np.broadcast_to(np.asarray(horizon_s, dtype=np.float64), (len(self),))
        if not (np.isfinite(h).all() and (h > 0).all()):
            raise ValueError("horizon_s: must be finite and > 0")
        x = np.log(self.horizons)
        xq = np.clip(np.log(h), x[0], x[-1])
        j = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, len(x) - 2) if len(x) > 1 else 0
        out = []
        for curve in (self.mean, self.low, self.high):
            y = np.log(curve)
            if len(x) == 1:
                out.append(np.exp(y[:, 0]))
                continue
            rows = np.arange(len(self))
            w = (xq - x[j]) / (x[j + 1] - x[j])
            out.append(np.exp(y[rows, j] + w * (y[rows, j + 1] - y[rows, j])))
        return out[0], out[1], out[2]

    def seconds(self, payload_bytes: npt.ArrayLike) -> tuple[F64, F64, F64]:
        """Median, fast (10th percentile) and slow (90th percentile) times to
        move ``payload_bytes``: one value, ``[N]``, or ``[N, m]`` (m payloads
        per window). The result has the payload's shape broadcast to ``[N]``
        or ``[N, m]``.

        Raises:
            ValueError: a payload that is not finite and >= 0.
        """
        bits = bits_of(payload_bytes)
        if not (np.isfinite(bits).all() and (bits >= 0).all()):
            raise ValueError("payload_bytes: must be finite and >= 0")
        n = len(self)
        if bits.ndim <= 1:
            b = np.broadcast_to(bits, (n,))[:, None]
            squeeze = True
        else:
            b = bits
            squeeze = False
        out = tuple(_invert(self.horizons, curve, b) for curve in (self.mean, self.high, self.low))
        if squeeze:
            return out[0][:, 0], out[1][:, 0], out[2][:, 0]
        return out[0], out[1], out[2]


def _invert(horizons: F64, mean: F64, bits: F64) -> F64:
    """Times ``[N, m]`` at which ``horizons * mean`` (bits delivered, made
    non-decreasing) reaches ``bits`` ``[N, m]``."""
    c = np.maximum.accumulate(horizons[None, :] * mean, axis=1)  # [N, H] Mbit
    n, h = c.shape
    rows = np.arange(n)[:, None]
    # k: how many horizons deliver less than the payload.
    k = (c[:, None, :] < bits[:, :, None]).sum(axis=2)  # [N, m]
    first_rate = c[:, :1] / horizons[0]
    last_rate = mean[:, -1:]
    t_first = bits / first_rate
    t_last = horizons[-1] + (bits - c[:, -1:]) / last_rate
    lo = np.clip(k - 1, 0, h - 1)
    hi = np.clip(k, 0, h - 1)
    c_lo, c_hi = c[rows, lo], c[rows, hi]
    x_lo, x_hi = np.log(horizons[lo]), np.log(horizons[hi])
    with np.errstate(divide="ignore", invalid="ignore"):
        w = (np.log(np.maximum(bits, 1e-300)) - np.log(c_lo)) / (np.log(c_hi) - np.log(c_lo))
        t_mid = np.exp(x_lo + np.clip(w, 0.0, 1.0) * (x_hi - x_lo))
    out = np.where(k == 0, t_first, np.where(k >= h, t_last, t_mid))
    result: F64 = np.where(bits > 0, out, 0.0)
    return result


def next_step_seconds(
    point_mbps: npt.ArrayLike, low_mbps: npt.ArrayLike, high_mbps: npt.ArrayLike, bits: F64
) -> tuple[F64, F64, F64]:
    """Today's rule: ``bits`` over the next-step forecast; the time's fast end
    at the interval's high end, its slow end at the low end (floored at
    :data:`MIN_BW_MBPS`)."""
    p = np.maximum(np.asarray(point_mbps, dtype=np.float64), MIN_BW_MBPS)
    lo = np.minimum(np.maximum(np.asarray(low_mbps, dtype=np.float64), MIN_BW_MBPS), p)
    hi = np.maximum(np.asarray(high_mbps, dtype=np.float64), p)
    return bits / p, bits / hi, bits / lo
