"""The Double DQN agent: its target, a short training run, greedy serving."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bwpredd.state import STATE_LAYOUT
from tests.helpers import HandTrace, write_csv_traces
from trainer.dqn import AgentConfig, double_dqn_target, train_loop
from trainer.env import prepare_traces
from trainer.evaluate_allocator import evaluate_policies, greedy_policy, torch_q_values
from trainer.memory import ReplayMemory, Transition
from trainer.models.qnet import QNetConfig, QNetwork, load_checkpoint, save_checkpoint
from trainer.report_allocator import departures


def random_walk_traces(seed: int, n: int = 12, length: int = 200) -> list[HandTrace]:
    """Log-random-walk bandwidth traces with occasional drops, at two scales."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        logbw = np.cumsum(rng.normal(0, 0.15, length)) + rng.uniform(0, 5)
        bw = np.exp(logbw) * np.where(rng.random(length) < 0.05, 0.3, 1.0)
        data = np.stack(
            [np.full(length, 40.0), bw, np.zeros(length), np.ones(length)], axis=1
        ).astype(np.float32)
        out.append(HandTrace(f"walk{i % 2}", f"w{i}", 1.0, data))
    return out


class TestDoubleDQNTarget:
    def test_online_picks_target_values(self) -> None:
        """The target values the online network's argmax with the target network."""
        q_online_next = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 4.0]])
        q_target_next = torch.tensor([[10.0, 20.0, 30.0], [7.0, 8.0, 9.0]])
        rewards = torch.tensor([0.5, -1.0])
        dones = torch.tensor([0.0, 0.0])
        y = double_dqn_target(q_online_next, q_target_next, rewards, dones, 0.9)
        # Row 0: online argmax = 1 -> target 20 (not the target's max 30).
        # Row 1: online argmax = 2 -> target 9.
        torch.testing.assert_close(y, torch.tensor([0.5 + 0.9 * 20.0, -1.0 + 0.9 * 9.0]))

    def test_terminal_does_not_bootstrap(self) -> None:
        """A terminal transition's target is its reward alone."""
        y = double_dqn_target(
            torch.tensor([[1.0, 2.0]]),
            torch.tensor([[3.0, 4.0]]),
            torch.tensor([0.25]),
            torch.tensor([1.0]),
            0.99,
        )
        torch.testing.assert_close(y, torch.tensor([0.25]))


class TestReplay:
    def test_bounded_and_overwrites_oldest(self) -> None:
        """The memory keeps at most its capacity, dropping the oldest first."""
        mem = ReplayMemory(5, 2)
        for i in range(7):
            s = np.full((1, 2), i, np.float32)
            mem.push(Transition(s, np.array([i]), s, np.array([i], np.float32), np.zeros(1)))
        assert len(mem) == 5
        batch = mem.sample(5, np.random.default_rng(0))
        assert sorted(batch.action.tolist()) == [2, 3, 4, 5, 6]

    def test_sample_is_seeded(self) -> None:
        """The same generator seed draws the same batch."""
        mem = ReplayMemory(100, 3)
        s = np.random.default_rng(0).random((50, 3)).astype(np.float32)
        mem.push(Transition(s, np.arange(50), s, np.zeros(50, np.float32), np.zeros(50)))
        a = mem.sample(8, np.random.default_rng(3)).action
        b = mem.sample(8, np.random.default_rng(3)).action
        assert a.tolist() == b.tolist()


class TestTraining:
    def test_short_run_beats_a_random_policy(self) -> None:
        """A seeded short run's greedy policy scores above a uniformly random one."""
        train = prepare_traces(random_walk_traces(0))
        val = prepare_traces(random_walk_traces(1, n=4))
        cfg = AgentConfig(
            episodes=25,
            episode_steps=32,
            lanes=4,
            eps_decay=0.85,
            eval_every=5,
            norm_states=1000,
            warmup=64,
        )
        model, hist = train_loop(train, val, cfg, seed=0, progress=False)
        rng = np.random.default_rng(0)
        res = evaluate_policies(
            val,
            {
                "ddqn": greedy_policy(torch_q_values(model)),
                "random": lambda env, s: rng.integers(0, 10, env.k),
            },
        )
        assert res["ddqn"]["macro"]["reward"] > res["random"]["macro"]["reward"] + 0.1
        assert hist["updates"] > 0
        assert len(hist["curve"]) == 25

    def test_training_is_deterministic(self) -> None:
        """Two runs with the same seed give the same weights."""
        train = prepare_traces(random_walk_traces(0, n=4, length=80))
        cfg = AgentConfig(episodes=4, episode_steps=16, lanes=2, eval_every=4, norm_states=200)
        a, _ = train_loop(train, [], cfg, seed=7, progress=False)
        b, _ = train_loop(train, [], cfg, seed=7, progress=False)
        for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            torch.testing.assert_close(va, vb, msg=ka)


class TestServing:
    @pytest.fixture
    def checkpoint(self, tmp_path: Path) -> Path:
        torch.manual_seed(0)
        model = QNetwork(QNetConfig(state_size=len(STATE_LAYOUT)))
        model.set_normalisation(torch.randn(256, len(STATE_LAYOUT)))
        path = tmp_path / "allocator.pt"
        save_checkpoint(model, str(path), state_layout=list(STATE_LAYOUT), seed=0)
        return path

    def test_greedy_serving_is_deterministic(self, checkpoint: Path) -> None:
        """A loaded allocator is in eval mode and maps the same state to the same action."""
        model, ckpt = load_checkpoint(str(checkpoint))
        assert not model.training
        assert ckpt["state_layout"] == list(STATE_LAYOUT)
        q = torch_q_values(model)
        states = np.random.default_rng(0).normal(size=(64, len(STATE_LAYOUT))).astype(np.float32)
        first = q(states).argmax(axis=1)
        for _ in range(5):
            np.testing.assert_array_equal(q(states).argmax(axis=1), first)
        # One state alone gets the action it gets in a batch (no batch statistics).
        assert int(q(states[3:4]).argmax(axis=1)[0]) == int(first[3])

    def test_greedy_policy_is_the_argmax(self, checkpoint: Path) -> None:
        """The served action is the argmax of the Q-values, never a random one."""
        model, _ = load_checkpoint(str(checkpoint))
        q = torch_q_values(model)
        states = np.random.default_rng(1).normal(size=(32, len(STATE_LAYOUT))).astype(np.float32)
        pol = greedy_policy(q)

        class FakeEnv:
            k = 32

        actions = pol(FakeEnv(), states)  # type: ignore[arg-type]
        np.testing.assert_array_equal(actions, q(states).argmax(axis=1))


class TestShippedHyperparameters:
    """The origin's hyperparameters stay the defaults; a run that departs from
    them says so in its report."""

    def test_defaults_are_the_origins(self) -> None:
        """AgentConfig's defaults are the origin's: 2000 episodes, gamma 0.99,
        epsilon 1.0 -> 0.01 decaying 0.995, replay 10,000, batch 64, sync 10."""
        cfg = AgentConfig()
        assert (cfg.episodes, cfg.gamma, cfg.eps_start, cfg.eps_end, cfg.eps_decay) == (
            2000,
            0.99,
            1.0,
            0.01,
            0.995,
        )
        assert (cfg.replay, cfg.batch, cfg.target_sync) == (10_000, 64, 10)
        assert departures(asdict(cfg)).startswith("* hyperparameters: the origin's")

    def test_departures_named(self) -> None:
        """A changed gamma and episode count are named with the origin's values."""
        line = departures(asdict(replace(AgentConfig(), gamma=0.8, episodes=3000)))
        assert "gamma 0.8 (origin 0.99)" in line and "episodes 3000 (origin 2000)" in line

    def test_train_flags_reach_the_agent(self, tmp_path: Path) -> None:
        """`trainer train --agent-gamma/--agent-episodes` set the agent's config,
        recorded in training_report.json and named in allocator.md."""
        import json

        from trainer.__main__ import main

        root = write_csv_traces(tmp_path / "traces", length=80)
        out = tmp_path / "run"
        code = main(["train", "--traces", str(root), "--seed", "0", "--out", str(out), "--quick",
                     "--quiet", "--agent-gamma", "0.5", "--agent-episodes", "12"])  # fmt: skip
        assert code == 0
        report = json.loads((out / "reports" / "training_report.json").read_text())
        config = report["ddqn_metrics"]["config"]
        assert config["gamma"] == 0.5 and config["episodes"] == 12
        text = (out / "reports" / "allocator.md").read_text()
        assert "gamma 0.5 (origin 0.99)" in text

    def test_members_train_side_by_side(self, tmp_path: Path) -> None:
        """`trainer train --members 2` trains two forecasters and two Q-networks
        in processes of their own (seeds 0 and 1) and ships their averages."""
        import json

        from trainer.__main__ import main
        from trainer.models.forecaster import load_checkpoint as load_forecaster

        root = write_csv_traces(tmp_path / "traces", length=80)
        out = tmp_path / "run"
        code = main(["train", "--traces", str(root), "--seed", "0", "--out", str(out), "--quick",
                     "--quiet", "--members", "2", "--agent-episodes", "6"])  # fmt: skip
        assert code == 0
        forecaster, _ = load_forecaster(str(out / "forecaster.pt"))
        allocator, _ = load_checkpoint(str(out / "allocator.pt"))
        assert forecaster.cfg.members == 2 and allocator.cfg.members == 2
        report = json.loads((out / "reports" / "training_report.json").read_text())
        assert len(report["training"]["history"]["members"]) == 2
        networks = report["ddqn_metrics"]["members"]
        assert [m["seed"] for m in networks] == [0, 1]
        # Different seeds, different networks.
        a, b = allocator.members
        assert not torch.equal(a.net[0].weight, b.net[0].weight)
        assert "2 Q-networks trained side by side" in (out / "reports" / "allocator.md").read_text()
        assert "network 1:" in (out / "reports" / "forecaster.md").read_text()

    def test_members_must_be_positive(self, tmp_path: Path) -> None:
        """--members 0 is refused with the flag named."""
        from trainer.__main__ import main

        code = main(["train", "--traces", str(tmp_path), "--quick", "--members", "0"])
        assert code == 2


class TestQNetworkMembers:
    def test_merge_averages_q_values(self) -> None:
        """A merged Q-network's Q-values are the mean of its members', each
        behind its own input standardisation."""
        torch.manual_seed(0)
        cfg = QNetConfig(state_size=len(STATE_LAYOUT))
        a, b = QNetwork(cfg), QNetwork(cfg)
        states = torch.randn(64, cfg.state_size) * 5 + 2
        a.set_normalisation(states)
        a.eval(), b.eval()
        merged = QNetwork.merge([a, b])
        assert merged.cfg.members == 2
        with torch.no_grad():
            torch.testing.assert_close(merged(states), (a(states) + b(states)) / 2)

    def test_merge_refuses_different_architectures(self) -> None:
        """Members must share their architecture."""
        with pytest.raises(ValueError, match="architectures differ"):
            QNetwork.merge([QNetwork(QNetConfig(state_size=4)), QNetwork(QNetConfig(state_size=5))])
