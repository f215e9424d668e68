"""Live accuracy: score each peer's last forecast against the sample that
then arrived, and decide when the model must give way to the baseline.

One job, per WindowStore slot, in preallocated numpy arrays (no Python loop
over peers; every call costs O(batch) numpy work, :meth:`LiveScores.summary`
O(capacity) for a metrics scrape):

1. :meth:`LiveScores.record` keeps the forecast made for a peer's next step:
   the model's point *and* the EWMA baseline's point. Only peers for which
   the model computed a point are recorded; a step is scored only when both
   predictors forecast it, so the comparison is like for like.
2. :meth:`LiveScores.score`, on ingest, with each peer's first newly accepted
   bandwidth after that forecast: adds ``|model - actual|``,
   ``|baseline - actual|`` and ``actual`` to the peer's rolling window of its
   last ``K`` scored steps and clears the pending forecast (so one forecast
   is scored once).
3. The guardrail, per peer (``K = guardrail_steps``, ``m = guardrail_margin``):

   * switches **on** when the window is full (``K`` scored steps) and the
     model's mean absolute error exceeds the baseline's by more than ``m``
     relative: ``MAE_model > (1 + m) * MAE_baseline``;
   * switches **off** when, over the last ``K`` steps, the model wins again:
     ``MAE_model <= MAE_baseline``;
   * between the two it keeps its state (hysteresis), so a peer whose errors
     hover at the threshold does not flap from one step to the next.

   While it is on, the daemon keeps computing (and recording) the model's
   forecast for the peer, or it could never see the model win again.
4. :meth:`LiveScores.reset` forgets a slot; hook it to
   ``WindowStore.on_reset`` so a reused slot never inherits a peer's scores.

Memory: three float32 ``[capacity, K]`` arrays (24 MB for 100k peers, K 20).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from bwpredd.accuracy import nmae

__all__ = ["Accuracy", "GuardChanges", "LiveScores"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]


class Accuracy(NamedTuple):
    """One peer's rolling live accuracy (0 errors when nothing is scored)."""

    scored_steps: int
    model_mae: float  # Mbit/s
    baseline_mae: float  # Mbit/s
    guardrail_active: bool


@dataclass(frozen=True)
class GuardChanges:
    """Slots whose guardrail switched during one :meth:`LiveScores.score`."""

    on: I64
    off: I64


class LiveScores:
    """Rolling live errors of the model and the baseline, per slot.

    Args:
        capacity: slots, as the WindowStore's.
        steps: ``K``, the rolling window and the guardrail's horizon.
        margin: the guardrail's relative margin ``m``.
        enabled: whether :meth:`fallback_mask` may answer True (scores are
            kept either way).
    """

    def __init__(
        self, capacity: int, steps: int = 20, margin: float = 0.1, enabled: bool = True
    ) -> None:
        if capacity < 1 or steps < 1:
            raise ValueError("capacity and steps must be >= 1")
        if not margin >= 0:
            raise ValueError("margin must be >= 0")
        self.capacity = capacity
        self.steps = steps
        self.margin = float(margin)
        self.enabled = enabled
        self._pending_model = np.full(capacity, np.nan, dtype=np.float32)
        self._pending_base = np.full(capacity, np.nan, dtype=np.float32)
        self._err_model = np.zeros((capacity, steps), dtype=np.float32)
        self._err_base = np.zeros((capacity, steps), dtype=np.float32)
        self._actual = np.zeros((capacity, steps), dtype=np.float32)
        self._head = np.zeros(capacity, dtype=np.int64)
        self._n = np.zeros(capacity, dtype=np.int64)
        self._guard = np.zeros(capacity, dtype=np.bool_)
        self.steps_scored = 0
        self.guard_switches_on = 0
        self.guard_switches_off = 0

    # -- writes -----------------------------------------------------------------

    def record(self, slots: I64, model_point: F32, baseline_point: F32, model_valid: B) -> None:
        """Keep the forecasts made for these peers' next step (replacing any
        earlier one not yet scored).

        Args:
            slots: ``[k]`` slots.
            model_point: ``[k]`` the model's point forecasts, Mbit/s, whether
                or not the model is serving (the guardrail needs both).
            baseline_point: ``[k]`` the EWMA baseline's points, Mbit/s.
            model_valid: ``[k]`` True where the model computed a point (full
                window and a model loaded); other peers get no pending forecast.
        """
        slots = np.asarray(slots, dtype=np.int64)
        m = np.asarray(model_point, dtype=np.float32)
        b = np.asarray(baseline_point, dtype=np.float32)
        ok = np.asarray(model_valid, dtype=np.bool_) & np.isfinite(m) & np.isfinite(b)
        self._pending_model[slots] = np.where(ok, m, np.float32(np.nan))
        self._pending_base[slots] = np.where(ok, b, np.float32(np.nan))

    def score(self, slots: I64, actual: F32 | F64) -> GuardChanges:
        """Score pending forecasts against each peer's newly arrived bandwidth.

        Args:
            slots: ``[k]`` slots with newly accepted samples; a slot listed
                more than once is scored against its first value only.
            actual: ``[k]`` the accepted bandwidths, Mbit/s.

        Returns:
            The slots whose guardrail switched on or off (to log).
        """
        slots = np.asarray(slots, dtype=np.int64)
        actual = np.asarray(actual, dtype=np.float32)
        if len(slots) > 1:
            slots, first = np.unique(slots, return_index=True)
            actual = actual[first]
        pm = self._pending_model[slots]
        ok = np.isfinite(pm) & np.isfinite(actual)
        s, a = slots[ok], actual[ok]
        empty = np.empty(0, dtype=np.int64)
        if s.size == 0:
            return GuardChanges(empty, empty)
        pos = self._head[s]
        self._err_model[s, pos] = np.abs(pm[ok] - a)
        self._err_base[s, pos] = np.abs(self._pending_base[s] - a)
        self._actual[s, pos] = a
        self._head[s] = (pos + 1) % self.steps
        self._n[s] = np.minimum(self._n[s] + 1, self.steps)
        self._pending_model[s] = np.nan
        self._pending_base[s] = np.nan
        self.steps_scored += int(s.size)

        # Sums over the window compare like means: both have n terms.
        sm = self._err_model[s].sum(axis=1, dtype=np.float64)
        sb = self._err_base[s].sum(axis=1, dtype=np.float64)
        was = self._guard[s]
        full = self._n[s] == self.steps
        on = ~was & full & (sm > (1.0 + self.margin) * sb)
        off = was & (sm <= sb)
        self._guard[s[on]] = True
        self._guard[s[off]] = False
        self.guard_switches_on += int(on.sum())
        self.guard_switches_off += int(off.sum())
        return GuardChanges(s[on], s[off])

    def reset(self, slots: I64) -> None:
        """Forget these slots (a new or evicted peer): the ``on_reset`` hook.

        Args:
            slots: ``[k]`` slots.
        """
        slots = np.asarray(slots, dtype=np.int64)
        self._pending_model[slots] = np.nan
        self._pending_base[slots] = np.nan
        self._err_model[slots] = 0.0
        self._err_base[slots] = 0.0
        self._actual[slots] = 0.0
        self._head[slots] = 0
        self._n[slots] = 0
        self._guard[slots] = False

    # -- reads ------------------------------------------------------------------

    def fallback_mask(self, slots: I64) -> B:
        """``[k]`` True where the guardrail answers the peer from the baseline.

        Args:
            slots: ``[k]`` slots.
        """
        if not self.enabled:
            return np.zeros(len(slots), dtype=np.bool_)
        return self._guard[np.asarray(slots, dtype=np.int64)].copy()

    def accuracy(self, slot: int) -> Accuracy:
        """One peer's rolling accuracy (for GetPeer).

        Args:
            slot: the peer's slot.
        """
        n = int(self._n[slot])
        if n == 0:
            return Accuracy(0, 0.0, 0.0, False)
        return Accuracy(
            n,
            float(self._err_model[slot].sum(dtype=np.float64) / n),
            float(self._err_base[slot].sum(dtype=np.float64) / n),
            bool(self._guard[slot]) and self.enabled,
        )

    def error_ratio(self, slots: I64) -> F64:
        """``[k]`` normalised MAE (sum |error| / sum actual over the window) of
        the predictor serving each peer: the baseline while its guardrail is
        on, else the model; NaN for unscored peers (for Advise's confidence).

        Args:
            slots: ``[k]`` slots.
        """
        slots = np.asarray(slots, dtype=np.int64)
        fallback = self.fallback_mask(slots)
        err = np.where(fallback[:, None], self._err_base[slots], self._err_model[slots])
        num = err.sum(axis=1, dtype=np.float64)
        den = self._actual[slots].sum(axis=1, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(den > 0, num / den, np.where(num > 0, np.inf, 0.0))
        return np.where(self._n[slots] > 0, ratio, np.nan)

    def summary(self) -> dict[str, float | int]:
        """Global aggregates for the metrics (O(capacity); call on scrape).

        Returns:
            ``peers_scored``; ``model_nmae`` and ``baseline_nmae``
            (:func:`bwpredd.accuracy.nmae` over the scored peers' windows;
            NaN when no peer with a non-zero actual is scored); ``peers_in_fallback``;
            ``steps_scored_total``; ``guard_switches_on_total`` and
            ``guard_switches_off_total``.
        """
        scored = np.flatnonzero(self._n > 0)
        out: dict[str, float | int] = {
            "peers_scored": int(scored.size),
            "model_nmae": float("nan"),
            "baseline_nmae": float("nan"),
            "peers_in_fallback": int(self._guard.sum()) if self.enabled else 0,
            "steps_scored_total": self.steps_scored,
            "guard_switches_on_total": self.guard_switches_on,
            "guard_switches_off_total": self.guard_switches_off,
        }
        actual = self._actual[scored].sum(axis=1, dtype=np.float64)
        out["model_nmae"] = nmae(self._err_model[scored].sum(axis=1, dtype=np.float64), actual)
        out["baseline_nmae"] = nmae(self._err_base[scored].sum(axis=1, dtype=np.float64), actual)
        return out
