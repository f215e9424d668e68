"""The allocator's training loop: Double DQN in the fluid-queue link environment.

One job: :func:`train_loop` trains a Q-network with the origin's
hyperparameters (:class:`AgentConfig`'s defaults: 2000 episodes, gamma 0.99,
epsilon 1.0 -> 0.01 decaying by 0.995 per episode, replay 10,000, batch 64,
target sync every 10 steps, Adam) and the Double DQN target, and keeps the
weights that score best on the validation traces. It follows the PyTorch DQN
tutorial: ``Transition`` and ``ReplayMemory`` (:mod:`trainer.memory`),
:func:`select_action`, :func:`optimize_model`. Episodes come from
:mod:`trainer.data.episodes`; :func:`trainer.train_agent.train_agent` runs
the whole training (data, members, evaluation, reports).

An episode is ``lanes`` segments of ``episode_steps`` steps from training
traces, stepped side by side. Segments end by a time limit, not a terminal
state, so their last transition bootstraps (``done = 0``).

Three additions to the origin's recipe, each measured on the validation split
(seed 0, LSTM forecast; see ``reports/allocator.md``): the step size decays
(cosine, to 10%); the evaluated and served network is an exponential moving
average of the online one (decay 0.999 per update); and each state is also
replayed with the exact outcome of one uniformly random other action
(:meth:`trainer.env.LinkEnv.counterfactual`), so the replay keeps covering
every level after epsilon has decayed. Without them the greedy policy's
validation reward swung between 0.63 and 0.79 from one check to the next and
sagged as epsilon fell; with them it stays within 0.75-0.80.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from bwpredd.state import LEVELS
from trainer.data.episodes import EpisodeSampler, normalisation_states
from trainer.env import EnvConfig, LinkEnv, PreparedTrace
from trainer.evaluate_allocator import evaluate_policies, greedy_policy, torch_q_values
from trainer.memory import ReplayMemory, Transition
from trainer.models.qnet import QNetConfig, QNetwork

__all__ = [
    "ORIGIN_HYPERPARAMETERS",
    "QUICK",
    "AgentConfig",
    "double_dqn_target",
    "optimize_model",
    "select_action",
    "train_loop",
]

F32 = npt.NDArray[np.float32]
N_ACTIONS = len(LEVELS)


@dataclass(frozen=True)
class AgentConfig:
    """Training hyperparameters; the defaults are the origin's where it had one."""

    episodes: int = 2000
    gamma: float = 0.99
    eps_start: float = 1.0
    eps_end: float = 0.01
    eps_decay: float = 0.995  # per episode
    replay: int = 10_000
    batch: int = 64
    target_sync: int = 10  # optimisation steps between target-network copies
    lr: float = 5e-4
    episode_steps: int = 32
    lanes: int = 8  # segments per episode, stepped together
    grad_clip: float = 10.0
    eval_every: int = 50  # episodes between validation scores
    norm_states: int = 20_000  # random-policy states that fix the input normalisation
    reward_offset: float = 0.0  # subtracted from rewards while learning (see train_loop)
    lr_final: float = 0.1  # the step size decays (cosine) to this fraction of lr
    ema: float = 0.999  # per-update decay of the served network's weight average
    counterfactual: int = 9  # extra random-action outcomes replayed per state
    warmup: int = 1000  # transitions stored before the first update
    crop_steps: int = 500  # longest stretch of each train/val trace that is used
    latency_jitter: float = 0.25  # share of flat-latency training traces given jitter
    members: int = 1  # Q-networks averaged, trained side by side (seeds seed, seed+1, ...)

    def epsilon(self, episode: int) -> float:
        """Exploration rate during ``episode`` (0-based)."""
        return max(self.eps_end, self.eps_start * self.eps_decay**episode)


# The origin's hyperparameters (the issue names them): AgentConfig's defaults.
ORIGIN_HYPERPARAMETERS = (
    "episodes",
    "gamma",
    "eps_start",
    "eps_end",
    "eps_decay",
    "replay",
    "batch",
    "target_sync",
)


# Seconds, for tests and bootstrapping: a handful of episodes on short crops.
QUICK = AgentConfig(
    episodes=30,
    episode_steps=32,
    lanes=4,
    eps_decay=0.9,
    eval_every=10,
    norm_states=2000,
    warmup=64,
    crop_steps=120,
)


def double_dqn_target(
    q_online_next: torch.Tensor,
    q_target_next: torch.Tensor,
    rewards: torch.Tensor,
    dones: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """The Double DQN target ``r + gamma (1 - done) Q_target(s', argmax_a Q_online(s', a))``.

    The online network picks the next action and the target network values
    it, which removes the max operator's upward bias.

    Args:
        q_online_next: ``[B, A]`` online Q-values of the next states.
        q_target_next: ``[B, A]`` target Q-values of the next states.
        rewards: ``[B]``.
        dones: ``[B]``, 1 where the next state is terminal.
        gamma: discount.
    """
    best = q_online_next.argmax(dim=1, keepdim=True)
    value = q_target_next.gather(1, best).squeeze(1)
    return rewards + gamma * (1.0 - dones) * value


def select_action(
    model: QNetwork, states: F32, epsilon: float, rng: np.random.Generator
) -> npt.NDArray[np.int64]:
    """Epsilon-greedy actions for ``states [K, S]`` (greedy part in eval mode)."""
    model.eval()
    with torch.no_grad():
        greedy = model(torch.from_numpy(states)).argmax(dim=1).numpy()
    explore = rng.random(len(states)) < epsilon
    return np.where(explore, rng.integers(0, N_ACTIONS, len(states)), greedy).astype(np.int64)


def optimize_model(
    policy: QNetwork,
    target: QNetwork,
    optimizer: torch.optim.Optimizer,
    memory: ReplayMemory,
    *,
    cfg: AgentConfig,
    rng: np.random.Generator,
) -> float:
    """One Huber-loss step on a replayed batch towards the Double DQN target."""
    batch = memory.sample(cfg.batch, rng)
    states = torch.from_numpy(batch.state)
    next_states = torch.from_numpy(batch.next_state)
    with torch.no_grad():
        # Both networks score s' in eval mode: batch-norm running statistics
        # and no dropout, as they will be served.
        policy.eval()
        q_online_next = policy(next_states)
        q_target_next = target(next_states)
        y = double_dqn_target(
            q_online_next,
            q_target_next,
            torch.from_numpy(batch.reward),
            torch.from_numpy(batch.done),
            cfg.gamma,
        )
    policy.train()
    q = policy(states).gather(1, torch.from_numpy(batch.action)[:, None]).squeeze(1)
    loss = nn.functional.smooth_l1_loss(q, y)
    optimizer.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    optimizer.step()
    return float(loss.detach())


def _seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def train_loop(
    train: Sequence[PreparedTrace],
    val: Sequence[PreparedTrace],
    cfg: AgentConfig,
    seed: int,
    progress: bool = True,
    *,
    member: int | None = None,
) -> tuple[QNetwork, dict[str, Any]]:
    """Train a Q-network; returns the weights best on ``val`` and the history.

    ``member`` names one of several networks trained side by side (its
    progress bar's name and row); None for a lone network.
    """
    # A 12-input MLP on batches of 64 gains nothing from intra-op threads and
    # loses a lot to them when the 2 cores are shared (measured: 122 ms vs
    # 4.5 ms per update under load), so the loop runs on one thread; the
    # forecaster's batch precompute before it uses two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_loop(train, val, cfg, seed, progress, member=member)
    finally:
        torch.set_num_threads(threads)


def _train_loop(
    train: Sequence[PreparedTrace],
    val: Sequence[PreparedTrace],
    cfg: AgentConfig,
    seed: int,
    progress: bool,
    *,
    member: int | None,
) -> tuple[QNetwork, dict[str, Any]]:
    from tqdm import tqdm

    t0, c0 = time.perf_counter(), time.process_time()
    rng = _seed_everything(seed)
    env_cfg = EnvConfig()
    sampler = EpisodeSampler(train, cfg.episode_steps, env_cfg.window)
    env = LinkEnv(train, env_cfg)
    # STATE_LAYOUT's columns, and any extra ones the traces carry (an experiment).
    n_state = env.state_size
    policy = QNetwork(QNetConfig(state_size=n_state, n_actions=N_ACTIONS))
    policy.set_normalisation(
        torch.from_numpy(normalisation_states(train, sampler, cfg.norm_states, rng))
    )
    target = QNetwork(policy.cfg)
    target.load_state_dict(policy.state_dict())
    target.eval()
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, fused=True)
    # Cosine decay of the step size to `lr_final` x lr: late updates refine the
    # policy instead of churning it (action gaps here are a few hundredths of
    # a reward; Q-values are tens).
    planned = max(cfg.episodes * cfg.episode_steps, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda u: (
            cfg.lr_final + (1 - cfg.lr_final) * 0.5 * (1 + np.cos(np.pi * min(u / planned, 1)))
        ),
    )
    # The served network is an exponential moving average of the online one:
    # the greedy argmax of a single noisy iterate flips between near-equal
    # levels from one update to the next; the average does not.
    averaged = QNetwork(policy.cfg)
    averaged.load_state_dict(policy.state_dict())
    averaged.eval()
    memory = ReplayMemory(cfg.replay, n_state)

    curve: list[float] = []
    val_curve: list[tuple[int, float]] = []
    best_val, best_state, best_episode = -np.inf, None, -1
    updates = 0
    bar = tqdm(
        range(cfg.episodes),
        desc="ddqn" if member is None else f"ddqn {member}",
        unit="ep",
        position=member or 0,
        disable=not progress,
    )
    for episode in bar:
        eps = cfg.epsilon(episode)
        states = env.reset(sampler.draw(cfg.lanes, rng))
        ep_reward, ep_steps = 0.0, 0.0
        while not env.finished.all():
            live = ~env.finished
            actions = select_action(policy, states, eps, rng)
            for _ in range(cfg.counterfactual):
                # What a uniformly random other action would have led to, from
                # the same state: replay keeps covering every action after
                # epsilon has decayed, instead of narrowing to the greedy one.
                alt = rng.integers(0, N_ACTIONS, env.k)
                alt_state, alt_reward = env.counterfactual(alt)
                n_live = int(live.sum())
                memory.push(
                    Transition(
                        states[live],
                        alt[live],
                        alt_state[live],
                        (alt_reward[live] - cfg.reward_offset).astype(np.float32),
                        np.zeros(n_live, np.float32),
                    )
                )
            res = env.step(actions)
            memory.push(
                Transition(
                    states[live],
                    actions[live],
                    res.state[live],
                    (res.reward[live] - cfg.reward_offset).astype(np.float32),
                    np.zeros(int(live.sum()), np.float32),
                )
            )
            ep_reward += float(res.reward.sum())
            ep_steps += float(live.sum())
            states = res.state
            if len(memory) >= max(cfg.batch, cfg.warmup):
                optimize_model(policy, target, optimizer, memory, cfg=cfg, rng=rng)
                schedule.step()
                # Warm-up: the average starts as a short one, so that a short
                # run is not dominated by the random initial weights.
                _ema_update(averaged, policy, min(cfg.ema, (1 + updates) / (10 + updates)))
                updates += 1
                if updates % cfg.target_sync == 0:
                    target.load_state_dict(policy.state_dict())
        curve.append(ep_reward / max(ep_steps, 1.0))
        last = (episode + 1) % cfg.eval_every == 0 or episode + 1 == cfg.episodes
        if last and val:
            score = _val_score(averaged, val)
            val_curve.append((episode + 1, score))
            if score > best_val:
                best_val, best_episode = score, episode + 1
                best_state = {k: v.clone() for k, v in averaged.state_dict().items()}
            bar.set_postfix(
                eps=f"{eps:.3f}", r100=f"{np.mean(curve[-100:]):.3f}", val=f"{score:.3f}"
            )
    if best_state is not None:
        averaged.load_state_dict(best_state)
    averaged.eval()
    history = {
        "curve": curve,
        "val_curve": val_curve,
        "best_val": float(best_val),
        "best_episode": best_episode,
        "updates": updates,
        "final_epsilon": cfg.epsilon(cfg.episodes - 1),
        "seed": seed,
        # Wall and CPU time of this network's loop (it may run in a process
        # of its own, whose CPU time the caller's clock does not see).
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
    return averaged, history


@torch.no_grad()
def _ema_update(averaged: QNetwork, online: QNetwork, decay: float) -> None:
    """``averaged <- decay averaged + (1 - decay) online``; integer buffers copied."""
    for (name, a), o in zip(
        averaged.state_dict().items(), online.state_dict().values(), strict=True
    ):
        if a.is_floating_point() and name.rsplit(".", 1)[-1] not in ("state_mean", "state_std"):
            a.lerp_(o, 1.0 - decay)
        else:
            a.copy_(o)


def _val_score(policy: QNetwork, val: Sequence[PreparedTrace], segment: int = 100) -> float:
    """Macro (over sources) mean per-step reward of the greedy policy on ``val``.

    Short segments (many lanes, few iterations) keep the 40 checks of a full
    run to seconds; every validation step is still scored.
    """
    res = evaluate_policies(val, {"ddqn": greedy_policy(torch_q_values(policy))}, segment)
    return float(res["ddqn"]["macro"]["reward"])
