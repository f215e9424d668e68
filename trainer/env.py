"""The allocation environment: a trace-driven fluid-queue link, vectorised.

Dynamics
--------
Time advances in the trace's own steps of ``dt = step_s`` seconds. Before step
``t`` the agent sees the last ``W = 10`` steps *as it observed them* and picks
an action ``a`` in 0..9. Its send rate is ``s = LEVELS[a] * C_t``, where the
**reference capacity** ``C_t`` is :func:`bwpredd.state.reference_capacity` of
that window: the 90th percentile of its bandwidth. The link then serves at the
trace's bandwidth ``c_t`` for that step, fed by a FIFO fluid queue::

    total  = q + s dt                      # Mbit waiting to cross the link
    served = min(c_t dt, total)
    q'     = total - served                # what the link could not carry
    drop   = max(0, q' - B_t);  q' <= B_t  # a finite buffer: overflow is loss
    B_t    = buffer_steps * C_t * dt       # "one step's worth" of the link

The queue raises the latency observed at the end of the step,
``latency = base_latency_t + 1000 q' / C_t`` ms (the queue drains at about the
reference rate), and the fraction of the step's data dropped is added to the
packet loss observed, ``1 - (1 - trace_loss_t)(1 - drop / (s dt))``. Both are
what the next windows carry, so an overshoot shows up in the next state as a
queue signal and then, if it persists, as loss. The state reads the queue in
the unit the reward charges it, ``queue_steps = (latency - min latency of the
window) / (1000 dt)``, which is why :func:`bwpredd.state.build_state` takes the
step length (the daemon reads it from the samples' times). Everything is measured in units
of the reference capacity, so the same dynamics hold on a 3G phone and a
datacenter link, whatever the trace's step length.

**Bandwidth does not depend on the action.** In a fluid model the capacity the
link delivers is the trace's, so the bandwidth column of the observed window is
the trace's own: only latency and loss carry the agent's footprint. That makes
two things exact and cheap: the reference capacity of every step, and the
forecaster's point and interval, which are computed once per trace, in batch,
on the trace's own windows (the forecaster sees the trace's latency and loss,
not the queue-inflated ones; its input is dominated by bandwidth, and running
the LSTM per step in torch eager would cost more than the whole training run).
With no forecaster checkpoint the forecast is the EWMA baseline with
:func:`bwpredd.baselines.baseline_interval`, as the daemon does at cold start.

Reward
------
Per step, in [-1, 1]::

    r = clip(u - queue_weight * q' / (C_t dt) - loss_weight * drop / (s dt), -1, 1)

with ``u = served / (c_t dt)`` the share of the link used (1 during an outage,
when there is nothing to waste). Sending exactly the link with no queue gives
1. Undershooting by ``x`` of the link costs ``x``; overshooting by ``x`` from
an empty queue costs ``queue_weight * x = 2x`` in that step *and again every
following step until the queue is drained*, and overflow adds loss on top:
overshoot costs more than undershoot, as a congestion collapse would.

Episodes are segments of traces (real and synthetic); :class:`LinkEnv` steps
many segments ("lanes") at once so evaluation and training stay vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from bwpredd.baselines import baseline_interval, ewma
from bwpredd.schema import BW, LAT, LOSS, WINDOW
from bwpredd.state import LEVELS, STATE_LAYOUT, build_state, reference_capacity
from trainer.predict import ForecastFn

__all__ = [
    "LEVEL_ARRAY",
    "QUEUE_EPS_STEPS",
    "EnvConfig",
    "LinkEnv",
    "PreparedTrace",
    "StepResult",
    "ewma_forecast",
    "link_step",
    "prepare_traces",
    "segment_lanes",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
LEVEL_ARRAY: F64 = np.asarray(LEVELS, dtype=np.float64)
N_ACTIONS = len(LEVELS)
STATE_SIZE = len(STATE_LAYOUT)
# Below this a step's capacity counts as an outage (1 kbit/s, as elsewhere).
OUTAGE_MBPS = 1e-3
# A queue shorter than 1% of a step of the reference capacity is rounding,
# not a queue, when counting the share of steps with a queue.
QUEUE_EPS_STEPS = 0.01


class TraceLike(Protocol):
    """What the environment reads from a ``bwpredd.traces.Trace``."""

    source: str
    name: str
    step_s: float
    data: F32


@dataclass(frozen=True)
class EnvConfig:
    """The link model's constants (defaults are the documented environment)."""

    buffer_steps: float = 0.5  # buffer = this many steps of reference capacity
    queue_weight: float = 2.0  # cost of a standing queue, per step of reference capacity
    loss_weight: float = 2.0  # cost of dropped data, per step of reference capacity
    window: int = WINDOW

    def __post_init__(self) -> None:
        if self.buffer_steps <= 0:
            raise ValueError(f"buffer_steps: must be > 0, got {self.buffer_steps}")
        if self.queue_weight <= 1 or self.loss_weight < 0:
            raise ValueError(
                "queue_weight must exceed 1 (overshoot > undershoot), loss_weight >= 0"
            )


@dataclass
class PreparedTrace:
    """One trace with everything the environment precomputes for it.

    Index ``t`` of ``capacity``/``point``/``low``/``high`` is about the
    decision before step ``t`` (from the window of steps ``t-W .. t-1``);
    entries ``t < W`` are NaN.
    """

    source: str
    name: str
    step_s: float
    data: F32  # [T, WIDTH] raw, as the trace says (no queue effects)
    capacity: F32  # [T] reference capacity
    point: F32  # [T] forecast of data[t, BW]
    low: F32
    high: F32
    # [T, E] extra state columns appended after STATE_LAYOUT's (an experiment's
    # richer state, trainer.allocator_state); None for the shipped state.
    extra: F32 | None = None

    @property
    def length(self) -> int:
        return int(self.data.shape[0])


def ewma_forecast(windows: F32) -> tuple[F32, F32, F32]:
    """The cold-start forecast: EWMA point and the baseline 80% interval."""
    point = ewma(windows)
    low, high = baseline_interval(windows, point)
    return point, low, high


def prepare_traces(
    traces: Sequence[TraceLike], forecast: ForecastFn | None = None, window: int = WINDOW
) -> list[PreparedTrace]:
    """Precompute reference capacity and forecasts for every window of every
    trace, in one batched forecaster call. Traces shorter than ``window + 1``
    steps are skipped (no decision can be made on them).

    Args:
        traces: objects with ``source``, ``name``, ``step_s`` and ``data [T, WIDTH]``.
        forecast: the forecaster; None means :func:`ewma_forecast`.
        window: window length.
    """
    forecast = forecast or ewma_forecast
    kept = [t for t in traces if t.data.shape[0] > window]
    all_windows = []
    for tr in kept:
        data = np.ascontiguousarray(tr.data, dtype=np.float32)
        # windows[j] = data[j : j + W], the window before step j + W.
        win = np.lib.stride_tricks.sliding_window_view(data, (window, data.shape[1]))[:-1, 0]
        all_windows.append(win)
    if not kept:
        return []
    stacked = np.concatenate(all_windows).astype(np.float32)
    point, low, high = forecast(stacked)
    cap = reference_capacity(stacked)
    out: list[PreparedTrace] = []
    offset = 0
    for tr, win in zip(kept, all_windows, strict=True):
        n = len(win)
        sl = slice(offset, offset + n)
        offset += n

        def pad(x: F32, sl: slice = sl, n: int = n) -> F32:
            full = np.full(n + window, np.nan, dtype=np.float32)
            full[window:] = x[sl]
            return full

        out.append(
            PreparedTrace(
                source=tr.source,
                name=tr.name,
                step_s=float(tr.step_s),
                data=np.ascontiguousarray(tr.data, dtype=np.float32),
                capacity=pad(cap),
                point=pad(point),
                low=pad(low),
                high=pad(high),
            )
        )
    return out


def link_step(
    queue: F64,
    level: F64,
    capacity: F64,
    link: F64,
    dt: F64,
    *,
    cfg: EnvConfig,
) -> dict[str, F64]:
    """One step of the fluid-queue link, vectorised; the single definition of
    the dynamics and the reward.

    Args:
        queue: Mbit queued before the step.
        level: fraction of the reference capacity sent (``LEVELS[a]``).
        capacity: reference capacity ``C_t``, Mbit/s.
        link: what the link delivers this step ``c_t``, Mbit/s.
        dt: step length, s.
        cfg: the link constants.

    Returns:
        ``queue`` (Mbit after the step), ``drop`` (Mbit), ``reward``, ``util``
        (share of the link used, 1 in an outage), ``waste`` (unused reachable
        capacity, in steps of ``C_t``), ``queue_steps`` (queue in steps of
        ``C_t``), ``loss`` (fraction of the step's data dropped), ``sent`` (Mbit).
    """
    cap_dt = np.maximum(capacity, OUTAGE_MBPS) * dt
    sent = level * cap_dt
    avail = np.maximum(link, 0.0) * dt
    total = queue + sent
    served = np.minimum(avail, total)
    q = total - served
    limit = cfg.buffer_steps * cap_dt
    drop = np.maximum(q - limit, 0.0)
    q = np.minimum(q, limit)
    outage = link < OUTAGE_MBPS
    util = np.where(outage, 1.0, served / np.where(outage, 1.0, avail))
    # Waste counts only the capacity a 100% level could have reached: a spike
    # above the reference is out of every action's reach.
    waste = np.maximum(np.minimum(avail, cap_dt) - served, 0.0) / cap_dt
    queue_steps = q / cap_dt
    reward = np.clip(
        1.0 - waste - cfg.queue_weight * queue_steps - cfg.loss_weight * drop / cap_dt, -1.0, 1.0
    )
    loss = drop / sent
    return {
        "queue": q,
        "drop": drop,
        "reward": reward,
        "util": util,
        "waste": waste,
        "queue_steps": queue_steps,
        "loss": loss,
        "sent": sent,
    }


@dataclass
class StepResult:
    """What :meth:`LinkEnv.step` returns for every lane."""

    state: F32  # [K, S] the next state (undefined where done)
    reward: F64  # [K]
    done: npt.NDArray[np.bool_]  # [K] the segment ended with this step
    info: dict[str, F64] = field(default_factory=dict)


def segment_lanes(
    traces: Sequence[PreparedTrace], max_steps: int, window: int = WINDOW
) -> list[tuple[int, int, int]]:
    """Cut every trace into consecutive segments of at most ``max_steps``
    decisions, covering each step ``t >= window`` exactly once.

    Returns:
        ``(trace index, first step, steps)`` per segment.
    """
    lanes = []
    for i, tr in enumerate(traces):
        for start in range(window, tr.length, max_steps):
            lanes.append((i, start, min(max_steps, tr.length - start)))
    return lanes


class LinkEnv:
    """Many independent segments ("lanes") of prepared traces stepped together.

    Each lane starts with an empty queue and the trace's own window as its
    history; lanes that finish stay finished (their rewards read 0 and their
    ``done`` stays True) until :meth:`reset`.
    """

    def __init__(self, traces: Sequence[PreparedTrace], cfg: EnvConfig | None = None) -> None:
        self.traces = list(traces)
        self.cfg = cfg or EnvConfig()
        self.k = 0
        # Flat copies so every per-lane lookup is one vectorised gather.
        lengths = np.array([tr.length for tr in self.traces], dtype=np.int64)
        self._offset = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self._length = lengths
        cat = np.concatenate
        self._flat: dict[str, F64] = {
            name: cat([getattr(tr, name) for tr in self.traces]).astype(np.float64)
            for name in ("capacity", "point", "low", "high")
        }
        self._data = cat([tr.data for tr in self.traces]).astype(np.float32)
        with_extra = [tr.extra is not None for tr in self.traces]
        if any(with_extra) and not all(with_extra):
            raise ValueError("traces: extra state columns on some traces but not all")
        self._extra: F32 | None = None
        if self.traces and all(with_extra):
            widths = {tr.extra.shape[1] for tr in self.traces if tr.extra is not None}
            if len(widths) != 1:
                raise ValueError(f"traces: extra state columns differ in width: {sorted(widths)}")
            self._extra = cat([tr.extra for tr in self.traces if tr.extra is not None]).astype(
                np.float32
            )

    @property
    def state_size(self) -> int:
        """Columns of a state: :data:`bwpredd.state.STATE_LAYOUT`'s, then any extra."""
        return STATE_SIZE + (0 if self._extra is None else int(self._extra.shape[1]))

    def _with_extra(self, states: F32, idx: I64) -> F32:
        """``states`` with the traces' extra columns at flat steps ``idx`` appended."""
        if self._extra is None:
            return states
        out: F32 = np.concatenate([states, self._extra[idx]], axis=1)
        return out

    def reset(self, lanes: Sequence[tuple[int, int, int]]) -> F32:
        """Start lanes at ``(trace index, first step, steps)``; returns states [K, S].

        Args:
            lanes: one tuple per lane; ``first step >= window``.
        """
        w = self.cfg.window
        self.k = k = len(lanes)
        self.trace_idx = np.array([lane[0] for lane in lanes], dtype=np.int64)
        self.t = np.array([lane[1] for lane in lanes], dtype=np.int64)
        self.end = self.t + np.array([lane[2] for lane in lanes], dtype=np.int64)
        if np.any(self.t < w):
            raise ValueError(f"lanes must start at step >= {w}")
        self.queue = np.zeros(k, dtype=np.float64)
        self.finished = np.zeros(k, dtype=bool)
        self.window = np.stack(
            [self.traces[i].data[s - w : s] for i, s in zip(self.trace_idx, self.t, strict=True)]
        ).astype(np.float32)
        self.step_s = np.array([self.traces[i].step_s for i in self.trace_idx], dtype=np.float64)
        return self.state()

    def _index(self) -> I64:
        """Flat index of each lane's current step (clamped to its trace)."""
        last = self._length[self.trace_idx] - 1
        return self._offset[self.trace_idx] + np.minimum(self.t, last)

    def _at(self, name: str) -> F64:
        """Per-lane value of a precomputed per-step array at the current step."""
        return self._flat[name][self._index()]

    def forecasts(self) -> tuple[F64, F64, F64, F64]:
        """``(capacity, point, low, high)`` for the current decision, per lane."""
        return self._at("capacity"), self._at("point"), self._at("low"), self._at("high")

    def state(self) -> F32:
        """The current states ``[K, S]``, built by the daemon's own
        :func:`bwpredd.state.build_state` from the observed windows."""
        _, point, low, high = self.forecasts()
        states = build_state(
            self.window,
            point.astype(np.float32),
            low.astype(np.float32),
            high.astype(np.float32),
            self.step_s,
        )
        return self._with_extra(states, self._index())

    def link(self) -> F64:
        """What the link will deliver this step, per lane (the oracle's view)."""
        delivered: F64 = self._data[self._index(), BW].astype(np.float64)
        return delivered

    def preview(self, actions: I64 | None = None) -> dict[str, F64]:
        """The outcome of each action (``[K, 10]`` per key) or of ``actions``
        (``[K]``), without stepping: what an oracle knowing ``c_t`` computes."""
        cap = np.maximum(self.forecasts()[0], OUTAGE_MBPS)
        link = self.link()
        if actions is None:
            return link_step(
                self.queue[:, None],
                LEVEL_ARRAY[None, :],
                cap[:, None],
                link[:, None],
                self.step_s[:, None],
                cfg=self.cfg,
            )
        return link_step(self.queue, LEVEL_ARRAY[actions], cap, link, self.step_s, cfg=self.cfg)

    def _outcome(self, actions: I64) -> tuple[dict[str, F64], F32]:
        """The link's outcome of ``actions`` and the window row each lane would
        observe, without changing the environment."""
        actions = np.asarray(actions, dtype=np.int64)
        if actions.shape != (self.k,) or actions.min() < 0 or actions.max() >= N_ACTIONS:
            raise ValueError(f"actions: expected {self.k} ints in 0..9")
        # The capacity used is recomputed from the observed window, as the
        # daemon would; it equals the precomputed one (bandwidth is the trace's).
        cap = reference_capacity(self.window).astype(np.float64)
        out = link_step(
            self.queue, LEVEL_ARRAY[actions], cap, self.link(), self.step_s, cfg=self.cfg
        )
        row = self._data[self._index()].copy()
        base_lat = row[:, LAT].astype(np.float64)
        row[:, LAT] = base_lat + 1000.0 * out["queue"] / np.maximum(cap, OUTAGE_MBPS)
        trace_loss = np.clip(row[:, LOSS].astype(np.float64), 0.0, 1.0)
        row[:, LOSS] = 1.0 - (1.0 - trace_loss) * (1.0 - out["loss"])
        return out, row

    def _next_state(self, row: F32) -> F32:
        """The state after appending ``row`` to every lane's window."""
        window = np.concatenate([self.window[:, 1:], row[:, None]], axis=1)
        idx = self._offset[self.trace_idx] + np.minimum(
            self.t + 1, self._length[self.trace_idx] - 1
        )
        states = build_state(
            window,
            self._flat["point"][idx].astype(np.float32),
            self._flat["low"][idx].astype(np.float32),
            self._flat["high"][idx].astype(np.float32),
            self.step_s,
        )
        return self._with_extra(states, idx)

    def counterfactual(self, actions: I64) -> tuple[F32, F64]:
        """``(next_state, reward)`` had each lane taken ``actions`` instead;
        the environment is unchanged. The trace-driven link is deterministic
        given the action, so this is exact, not a model.

        Args:
            actions: ``[K]`` ints in 0..9.
        """
        out, row = self._outcome(actions)
        return self._next_state(row), out["reward"]

    def step(self, actions: I64) -> StepResult:
        """Apply one action per lane and advance every unfinished lane.

        Args:
            actions: ``[K]`` ints in 0..9.
        """
        out, row = self._outcome(actions)
        live = ~self.finished
        self.queue = np.where(live, out["queue"], self.queue)
        self.window = np.where(
            live[:, None, None],
            np.concatenate([self.window[:, 1:], row[:, None]], axis=1),
            self.window,
        )
        self.t = np.where(live, self.t + 1, self.t)
        done = self.t >= self.end
        self.finished = done
        info = {k: np.where(live, v, 0.0) for k, v in out.items()}
        info["live"] = live.astype(np.float64)
        return StepResult(
            state=self.state(), reward=np.where(live, out["reward"], 0.0), done=done, info=info
        )
