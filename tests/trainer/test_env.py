"""The fluid-queue link environment on hand-made traces."""

from __future__ import annotations

import numpy as np
import pytest

from bwpredd.state import STATE_LAYOUT, build_state, reference_capacity
from tests.helpers import HandTrace
from trainer.env import EnvConfig, LinkEnv, ewma_forecast, link_step, prepare_traces

QUEUE_SIGNAL = STATE_LAYOUT.index("queue_signal")


def make_trace(bandwidth: list[float], step_s: float = 1.0, latency: float = 50.0) -> HandTrace:
    """A trace with the given bandwidth, constant latency, no loss."""
    bw = np.asarray(bandwidth, np.float32)
    data = np.stack(
        [np.full_like(bw, latency), bw, np.zeros_like(bw), np.ones_like(bw)], axis=1
    ).astype(np.float32)
    return HandTrace("hand", "t", step_s, data)


def env_at_step_10(bandwidth: list[float]) -> tuple[LinkEnv, np.ndarray]:
    """An environment with one lane at step 10 of a hand trace."""
    env = LinkEnv(prepare_traces([make_trace(bandwidth)]))
    states = env.reset([(0, 10, len(bandwidth) - 11)])
    return env, states


# 10 steps at 10 Mbit/s (reference capacity 10), then the link halves to 5.
DROP = [10.0] * 10 + [5.0] * 10


class TestDynamics:
    def test_overshoot_builds_queue_and_raises_latency_next_step(self) -> None:
        """Sending 100% into a halved link queues the excess, shown as latency next step."""
        env, states = env_at_step_10(DROP)
        assert states[0, QUEUE_SIGNAL] == pytest.approx(0.0)
        res = env.step(np.array([9]))
        # 10 Mbit sent, 5 served: 5 Mbit queued = 0.5 s at the 10 Mbit/s reference.
        assert res.info["queue"][0] == pytest.approx(5.0)
        assert env.window[0, -1, 0] == pytest.approx(50.0 + 500.0)
        assert res.state[0, QUEUE_SIGNAL] == pytest.approx(10.0)
        assert res.reward[0] < 0.5

    def test_queue_drains_when_sending_below_the_link(self) -> None:
        """A queue drains when the agent sends below what the link delivers."""
        env, _ = env_at_step_10(DROP)
        env.step(np.array([9]))
        res = env.step(np.array([0]))  # 1 Mbit + 5 queued over a 5 Mbit/s link
        assert res.info["queue"][0] == pytest.approx(1.0)
        res = env.step(np.array([0]))
        assert res.info["queue"][0] == pytest.approx(0.0)

    def test_overflow_becomes_loss(self) -> None:
        """Queueing beyond the buffer drops data, seen as packet loss next step."""
        env, _ = env_at_step_10(DROP)
        env.step(np.array([9]))  # queue 5 Mbit = the half-step buffer, full
        res = env.step(np.array([9]))  # 5 more Mbit cannot fit
        assert res.info["drop"][0] == pytest.approx(5.0)
        assert env.window[0, -1, 2] == pytest.approx(0.5)
        assert res.reward[0] == pytest.approx(-1.0)

    def test_undershoot_wastes_capacity(self) -> None:
        """Sending half the link uses half of it, builds no queue, and scores 0.5."""
        env, _ = env_at_step_10([10.0] * 20)
        res = env.step(np.array([4]))
        assert res.info["util"][0] == pytest.approx(0.5)
        assert res.info["queue"][0] == pytest.approx(0.0)
        assert res.reward[0] == pytest.approx(0.5)

    def test_exact_match_scores_one(self) -> None:
        """Sending exactly what the link delivers, with no queue, scores 1."""
        env, _ = env_at_step_10(DROP)
        res = env.step(np.array([4]))  # 50% of 10 = the 5 Mbit/s link
        assert res.reward[0] == pytest.approx(1.0)

    def test_overshoot_costs_more_than_the_same_undershoot(self) -> None:
        """Missing the link by 3 Mbit/s costs more above it than below it."""
        cfg = EnvConfig()
        one = np.ones(1)
        over = link_step(0 * one, 0.8 * one, 10 * one, 5 * one, one, cfg=cfg)["reward"][0]
        under = link_step(0 * one, 0.2 * one, 10 * one, 5 * one, one, cfg=cfg)["reward"][0]
        assert over < under
        assert 1 - over == pytest.approx(2 * (1 - under))

    def test_reward_bounds(self) -> None:
        """Every reward lies in [-1, 1], over random queues, levels and links."""
        rng = np.random.default_rng(0)
        n = 10_000
        cap = rng.lognormal(0, 2, n)
        out = link_step(
            rng.uniform(0, 0.5, n) * cap,
            rng.choice(np.arange(1, 11) / 10, n),
            cap,
            cap * rng.choice([0.0, 0.5, 1.0, 3.0], n) * rng.uniform(0, 1, n),
            rng.choice([0.5, 1.0, 5.0], n),
            cfg=EnvConfig(),
        )
        assert out["reward"].min() >= -1.0
        assert out["reward"].max() <= 1.0
        assert out["reward"].min() == -1.0

    def test_dynamics_do_not_depend_on_step_length(self) -> None:
        """The same trace at 0.5 s and 5 s steps gives the same rewards."""
        rewards = []
        for step_s in (0.5, 5.0):
            env = LinkEnv(prepare_traces([make_trace(DROP, step_s=step_s)]))
            env.reset([(0, 10, 9)])
            rewards.append([env.step(np.array([a])).reward[0] for a in (9, 2, 6, 4)])
        np.testing.assert_allclose(rewards[0], rewards[1])


class TestObservation:
    def test_state_is_the_daemons_build_state(self) -> None:
        """The env's state equals bwpredd.state.build_state on its observed window."""
        rng = np.random.default_rng(1)
        env = LinkEnv(prepare_traces([make_trace(list(rng.uniform(1, 20, 40)), step_s=0.5)]))
        env.reset([(0, 10, 29)])
        for a in (9, 9, 3, 7):
            res = env.step(np.array([a]))
        point, low, high = ewma_forecast(env.window)
        expected = build_state(env.window, point, low, high, 0.5)
        np.testing.assert_allclose(res.state, expected, rtol=1e-5)

    def test_queue_steps_reads_the_queue(self) -> None:
        """On a link with a flat base latency, the state's queue_steps is the
        environment's queue in steps of the reference capacity, at any step length."""
        col = STATE_LAYOUT.index("queue_steps")
        for step_s in (0.5, 5.0):
            env = LinkEnv(prepare_traces([make_trace(DROP, step_s=step_s)]))
            env.reset([(0, 10, 9)])
            res = env.step(np.array([9]))  # 100% of 10 into a 5 Mbit/s link
            queue_steps = env.queue[0] / (10.0 * step_s)
            assert queue_steps > 0.1
            assert res.state[0, col] == pytest.approx(queue_steps, rel=1e-5)

    def test_reference_capacity_is_p90_of_the_window(self) -> None:
        """The precomputed reference capacity is the p90 of the window's bandwidth."""
        bw = list(np.arange(1.0, 31.0))
        prepared = prepare_traces([make_trace(bw)])[0]
        window = prepared.data[5:15][None]
        assert prepared.capacity[15] == pytest.approx(float(reference_capacity(window)[0]))
        assert np.isnan(prepared.capacity[:10]).all()

    def test_lanes_finish_independently(self) -> None:
        """A short lane finishes and scores 0 while a longer one keeps going."""
        env = LinkEnv(prepare_traces([make_trace([10.0] * 30)]))
        env.reset([(0, 10, 2), (0, 10, 5)])
        for _ in range(2):
            res = env.step(np.array([4, 4]))
        assert res.done.tolist() == [True, False]
        res = env.step(np.array([4, 4]))
        assert res.reward.tolist() == [0.0, 0.5]

    def test_counterfactual_matches_the_step_it_predicts(self) -> None:
        """counterfactual(a) gives the state and reward step(a) then produces."""
        rng = np.random.default_rng(2)
        env, _ = env_at_step_10(list(rng.uniform(1, 20, 40)))
        env.step(np.array([9]))
        state, reward = env.counterfactual(np.array([7]))
        other, _ = env.counterfactual(np.array([0]))
        res = env.step(np.array([7]))
        np.testing.assert_allclose(state, res.state, rtol=1e-6)
        np.testing.assert_allclose(reward, res.reward)
        # A different action leaves a different footprint (the queue from the 100% step).
        assert not np.allclose(other, res.state)
