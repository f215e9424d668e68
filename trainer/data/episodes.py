"""The allocator's training data: cropped traces, episode segments, and the
states that fix the Q-network's input scale.

:func:`crop_traces` cuts each trace to a seeded window (and gives some
flat-latency traces jitter) before the forecaster runs over it;
:func:`with_synthetic` adds the synthetic profiles to the training traces;
:class:`EpisodeSampler` draws the segments an episode steps through;
:func:`normalisation_states` visits states with a uniformly random policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd.schema import LAT
from bwpredd.state import LEVELS
from trainer.data.synthetic import synthetic_traces
from trainer.env import LinkEnv, PreparedTrace

__all__ = [
    "CroppedTrace",
    "EpisodeSampler",
    "crop_traces",
    "normalisation_states",
    "with_synthetic",
]

F32 = npt.NDArray[np.float32]


class EpisodeSampler:
    """Draws training segments: source uniform, trace by length, start uniform."""

    def __init__(self, traces: Sequence[PreparedTrace], steps: int, window: int) -> None:
        self.steps = steps
        self.window = window
        self.by_source: dict[str, list[int]] = {}
        for i, tr in enumerate(traces):
            # A segment needs one step after its last for the bootstrap state.
            if tr.length >= window + 2:
                self.by_source.setdefault(tr.source, []).append(i)
        self.sources = sorted(self.by_source)
        self.lengths = [tr.length for tr in traces]

    def draw(self, k: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
        """``k`` lanes ``(trace, first step, steps)``."""
        lanes = []
        for _ in range(k):
            idx = self.by_source[self.sources[rng.integers(len(self.sources))]]
            w = np.array([self.lengths[i] for i in idx], dtype=np.float64)
            i = idx[rng.choice(len(idx), p=w / w.sum())]
            room = self.lengths[i] - 1 - self.window  # decisions that have a next state
            steps = min(self.steps, room)
            start = self.window + int(rng.integers(0, room - steps + 1))
            lanes.append((i, start, steps))
        return lanes


def normalisation_states(
    traces: Sequence[PreparedTrace], sampler: EpisodeSampler, n: int, rng: np.random.Generator
) -> F32:
    """States visited by a uniformly random policy: a fixed input scale."""
    env = LinkEnv(traces)
    out: list[F32] = []
    total = 0
    while total < n:
        states = env.reset(sampler.draw(16, rng))
        while not env.finished.all():
            live = ~env.finished
            out.append(states[live])
            total += int(live.sum())
            states = env.step(rng.integers(0, len(LEVELS), env.k)).state
    return np.concatenate(out)[:n]


@dataclass
class CroppedTrace:
    """A stretch of a trace, under the trace's source and name."""

    source: str
    name: str
    step_s: float
    data: npt.NDArray[np.float32]


def crop_traces(
    traces: Sequence[Any], steps: int, rng: np.random.Generator, jitter: float = 0.0
) -> list[CroppedTrace]:
    """Each trace cut to a random window of at most ``steps`` steps (same
    source and name: a crop, not a new trace).

    With probability ``jitter``, a trace whose latency was not measured (a
    constant default) gets a random base RTT and AR(1) log-normal jitter:
    real links are never that quiet, and an agent that only ever saw a flat
    latency would read any jitter as a queue.
    """
    out = []
    for tr in traces:
        n = tr.data.shape[0]
        start = int(rng.integers(0, n - steps + 1)) if n > steps else 0
        data = np.array(tr.data[start : start + steps], dtype=np.float32)
        measured = getattr(tr, "measured", ("latency_ms",))
        if "latency_ms" not in measured and rng.random() < jitter:
            base = np.exp(rng.uniform(np.log(5.0), np.log(200.0)))
            sigma, rho = rng.uniform(0.02, 0.25), rng.uniform(0.0, 0.9)
            eps = rng.normal(0.0, sigma * np.sqrt(1 - rho**2), len(data))
            noise = np.zeros(len(data))
            for t in range(len(data)):
                noise[t] = rho * noise[t - 1] + eps[t] if t else eps[t]
            data[:, LAT] = base * np.exp(noise)
        out.append(CroppedTrace(tr.source, tr.name, float(tr.step_s), data))
    return out


def with_synthetic(train: list[Any], seed: int, quick: bool) -> list[Any]:
    """Add the synthetic profiles to the training traces unless already there."""
    if quick or any(t.source.startswith("synthetic") for t in train):
        return train
    return [*train, *synthetic_traces(seed)]
