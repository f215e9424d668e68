"""The allocation agent's replay memory: ``Transition`` and a bounded
``ReplayMemory`` with ``push`` / ``sample`` / ``__len__``, as in the PyTorch
DQN tutorial.

The memory is a ring buffer of preallocated numpy arrays rather than a deque
of tuples: the vectorised environment pushes several lanes per step, and
sampling 64 rows by index from arrays (with the trainer's seeded generator)
is both faster and reproducible.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["ReplayMemory", "Transition"]


class Transition(NamedTuple):
    """A batch (or one) of ``(state, action, next_state, reward, done)``."""

    state: npt.NDArray[np.float32]
    action: npt.NDArray[np.int64]
    next_state: npt.NDArray[np.float32]
    reward: npt.NDArray[np.float32]
    done: npt.NDArray[np.float32]


class ReplayMemory:
    """The last ``capacity`` transitions; older ones are overwritten first.

    Args:
        capacity: how many transitions to keep.
        state_size: length of a state vector.
    """

    def __init__(self, capacity: int, state_size: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity: must be > 0, got {capacity}")
        self.capacity = capacity
        self._state = np.zeros((capacity, state_size), np.float32)
        self._next = np.zeros((capacity, state_size), np.float32)
        self._action = np.zeros(capacity, np.int64)
        self._reward = np.zeros(capacity, np.float32)
        self._done = np.zeros(capacity, np.float32)
        self._pos = 0
        self._size = 0

    def push(self, t: Transition) -> None:
        """Store one transition, or a batch of them (leading axis).

        Args:
            t: arrays with a leading batch axis, or one unbatched transition.
        """
        state = np.atleast_2d(t.state)
        n = len(state)
        idx = (self._pos + np.arange(n)) % self.capacity
        self._state[idx] = state
        self._next[idx] = np.atleast_2d(t.next_state)
        self._action[idx] = np.atleast_1d(t.action)
        self._reward[idx] = np.atleast_1d(t.reward)
        self._done[idx] = np.atleast_1d(t.done)
        self._pos = int((self._pos + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Transition:
        """A uniform random batch (without replacement) of stored transitions.

        Args:
            batch_size: rows to draw; at most ``len(self)``.
            rng: the caller's seeded generator.
        """
        if batch_size > self._size:
            raise ValueError(f"sample: {batch_size} requested, {self._size} stored")
        idx = rng.choice(self._size, size=batch_size, replace=False)
        return Transition(
            self._state[idx], self._action[idx], self._next[idx], self._reward[idx], self._done[idx]
        )

    def __len__(self) -> int:
        return self._size
