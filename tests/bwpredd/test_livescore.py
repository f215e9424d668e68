"""Live scoring of forecasts and the guardrail that falls back to the baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bwpredd.livescore import LiveScores
from bwpredd.windows import WindowStore


def arr(*v: float) -> np.ndarray:
    return np.asarray(v, dtype=np.float32)


def slots(*v: int) -> np.ndarray:
    return np.asarray(v, dtype=np.int64)


def step(ls: LiveScores, slot: int, model: float, base: float, actual: float) -> None:
    """Record one forecast for ``slot`` and score it."""
    ls.record(slots(slot), arr(model), arr(base), np.array([True]))
    ls.score(slots(slot), arr(actual))


class TestScoring:
    def test_arithmetic_by_hand(self) -> None:
        """MAEs are the means of |forecast - actual| over scored steps."""
        ls = LiveScores(4, steps=5)
        step(ls, 2, model=10, base=12, actual=11)  # errors 1, 1
        step(ls, 2, model=20, base=14, actual=17)  # errors 3, 3
        step(ls, 2, model=5, base=9, actual=9)  # errors 4, 0
        acc = ls.accuracy(2)
        assert acc.scored_steps == 3
        assert acc.model_mae == pytest.approx((1 + 3 + 4) / 3)
        assert acc.baseline_mae == pytest.approx((1 + 3 + 0) / 3)
        assert not acc.guardrail_active
        # Normalised MAE of the serving model: sum |err| / sum actual.
        assert ls.error_ratio(slots(2))[0] == pytest.approx(8 / (11 + 17 + 9))
        assert ls.accuracy(0) == (0, 0.0, 0.0, False)
        assert math.isnan(ls.error_ratio(slots(0))[0])

    def test_batch_scores_many_peers_and_only_pending_ones(self) -> None:
        """One call scores every slot with a pending forecast, the first value
        of a repeated slot only, and nothing twice."""
        ls = LiveScores(8, steps=3)
        ls.record(slots(0, 1, 2), arr(10, 20, 30), arr(11, 21, 31), np.array([True, True, False]))
        ls.score(slots(1, 0, 0, 2, 5), arr(25, 7, 1000, 30, 1))
        assert ls.accuracy(0)[:3] == (1, 3.0, 4.0)
        assert ls.accuracy(1)[:3] == (1, 5.0, 4.0)
        assert ls.accuracy(2).scored_steps == 0  # the model had no point
        assert ls.accuracy(5).scored_steps == 0  # no forecast was made
        ls.score(slots(0, 1), arr(1, 1))  # pending cleared: not scored again
        assert ls.accuracy(0).scored_steps == 1
        assert ls.steps_scored == 2

    def test_rolling_window_keeps_the_last_k(self) -> None:
        """Past K steps the oldest error leaves the window."""
        ls = LiveScores(2, steps=3)
        for err in (100, 1, 2, 3):
            step(ls, 0, model=10 + err, base=10, actual=10)
        acc = ls.accuracy(0)
        assert acc.scored_steps == 3
        assert acc.model_mae == pytest.approx(2.0)
        assert acc.baseline_mae == 0.0

    def test_summary_aggregates(self) -> None:
        """Mean normalised error per predictor over scored peers."""
        ls = LiveScores(4, steps=4)
        step(ls, 0, model=9, base=8, actual=10)  # 0.1, 0.2
        step(ls, 1, model=30, base=20, actual=20)  # 0.5, 0.0
        s = ls.summary()
        assert s["peers_scored"] == 2
        assert s["model_nmae"] == pytest.approx((0.1 + 0.5) / 2)
        assert s["baseline_nmae"] == pytest.approx((0.2 + 0.0) / 2)
        assert s["peers_in_fallback"] == 0
        assert s["steps_scored_total"] == 2
        assert math.isnan(LiveScores(2).summary()["model_nmae"])


class TestGuardrail:
    def test_switches_on_when_the_model_loses_and_off_when_it_wins(self) -> None:
        """On after K losing steps (not before), off once the model wins again."""
        k = 5
        ls = LiveScores(3, steps=k, margin=0.1)
        for _ in range(k):
            assert not ls.fallback_mask(slots(1))[0], "needs K full steps"
            step(ls, 1, model=150, base=101, actual=100)  # model 50 vs baseline 1
        assert ls.fallback_mask(slots(0, 1, 2)).tolist() == [False, True, False]
        assert ls.accuracy(1).guardrail_active
        assert ls.summary()["peers_in_fallback"] == 1
        # The model keeps being scored; it now wins: error 1 vs 9 per step.
        switched_off_at = None
        for i in range(k):
            ls.record(slots(1), arr(100), arr(110), np.array([True]))
            changes = ls.score(slots(1), arr(101))
            if changes.off.size:
                switched_off_at = i
                assert changes.off.tolist() == [1]
                break
        assert switched_off_at is not None
        assert not ls.fallback_mask(slots(1))[0]
        # After j winning steps the window sums are 50(5-j) + j vs (5-j) + 9j:
        # the model's is first no larger at j = 5, the last step.
        assert switched_off_at == k - 1
        assert ls.guard_switches_on == 1 and ls.guard_switches_off == 1

    def test_margin_and_hysteresis(self) -> None:
        """Within the margin it stays off; between wins and the margin it
        keeps its state."""
        ls = LiveScores(1, steps=4, margin=0.1)
        for _ in range(4):
            step(ls, 0, model=10.5, base=10.0, actual=0.0)  # model 5% worse
        assert not ls.fallback_mask(slots(0))[0]
        for _ in range(4):
            step(ls, 0, model=12.0, base=10.0, actual=0.0)  # 20% worse: on
        assert ls.fallback_mask(slots(0))[0]
        for _ in range(4):
            step(ls, 0, model=10.5, base=10.0, actual=0.0)  # 5% worse: stays on
        assert ls.fallback_mask(slots(0))[0]
        step(ls, 0, model=9.0, base=10.0, actual=0.0)
        step(ls, 0, model=9.0, base=10.0, actual=0.0)  # now the model wins
        assert not ls.fallback_mask(slots(0))[0]

    def test_disabled_never_falls_back(self) -> None:
        """With the guardrail off, scores are kept but nothing falls back."""
        ls = LiveScores(1, steps=2, enabled=False)
        for _ in range(3):
            step(ls, 0, model=100, base=1, actual=1)
        assert not ls.fallback_mask(slots(0))[0]
        assert ls.accuracy(0).scored_steps == 2
        assert not ls.accuracy(0).guardrail_active

    def test_reset_on_slot_reuse(self) -> None:
        """A slot the WindowStore hands to a new peer starts clean."""
        store = WindowStore(1, (50.0, 0.0, 0.0, 1.0))
        ls = LiveScores(1, steps=2)
        store.on_reset(ls.reset)
        rows = np.array([[1.0, 10.0, 0.0, 1.0]], dtype=np.float32)
        store.ingest(["a"], rows, np.array([1.0]), now=1.0)
        slot = store.slot("a")
        assert slot is not None
        for _ in range(2):
            step(ls, slot, model=100, base=10, actual=10)
        ls.record(slots(slot), arr(5), arr(5), np.array([True]))
        assert ls.fallback_mask(slots(slot))[0]
        store.ingest(["b"], rows, np.array([2.0]), now=2.0)  # evicts "a"
        assert store.slot("b") == slot
        assert ls.accuracy(slot) == (0, 0.0, 0.0, False)
        ls.score(slots(slot), arr(5))  # a's pending forecast is gone too
        assert ls.accuracy(slot).scored_steps == 0

    def test_vectorised_over_many_peers(self) -> None:
        """10k peers score in one call, each with its own arithmetic."""
        n = 10_000
        ls = LiveScores(n, steps=2, margin=0.0)
        s = np.arange(n, dtype=np.int64)
        actual = np.full(n, 100, dtype=np.float32)
        model = np.where(s % 2 == 0, 150, 100).astype(np.float32)
        for _ in range(2):
            ls.record(s, model, np.full(n, 110, np.float32), np.ones(n, bool))
            changes = ls.score(s, actual)
        assert changes.on.tolist() == s[s % 2 == 0].tolist()
        mask = ls.fallback_mask(s)
        assert mask.sum() == n // 2 and mask[0] and not mask[1]
