"""The forecaster's training loop: sampling, loss, early stopping.

What was measured to matter (issue 3) is the loss and the sampling, not the
architecture:

- **Loss**: the point head's absolute error divided by the trace's mean
  bandwidth (exactly the normalised MAE the evaluation reports), plus pinball
  losses for the 0.1 / 0.9 quantile heads on the same scale. Squared error on
  raw Mbit/s lets a few 5G traces at hundreds of Mbit/s drown everything else.
- **Sampling**: every batch row picks a source (by weight, uniform by
  default), then a trace of that source uniformly, then a window of that
  trace uniformly. A source with one long trace weighs as much as one with
  hundreds of short ones; a 7-hour Puffer session as much as a 30 s one.

An epoch is a fixed number of sampled batches; after each, ``estimate_loss``
scores a fixed, evenly spaced set of validation windows with the same
weighting, and the best weights by validation loss are kept (early stopping
with patience). Training stops on early stopping or ``max_epochs``, counted in
updates, never on the clock (``time_budget_s`` is an optional cap, off by
default): a seed gives the same model on a slow machine as on a fast one.

Under torchrun (:mod:`trainer.distributed`) the traces are sharded across the
ranks and every rank draws the same global batches; each computes the rows
of its own traces and the gradients are summed, so the model is the one a
lone process trains, within floating-point reduction order
(:mod:`trainer.data_parallel`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from bwpredd.schema import BW, WINDOW
from trainer import distributed
from trainer.data_parallel import ShardedBatch, assign_shards, shard_modules, unshard_modules
from trainer.models.forecaster import Forecaster, ForecasterConfig

__all__ = [
    "History",
    "TraceBank",
    "TrainConfig",
    "calibrate_interval",
    "forecaster_loss",
    "train_forecaster",
]

# A trace whose mean is 0 still needs a finite scale for its loss.
SCALE_FLOOR_MBPS = 1e-3


class _TraceLike(Protocol):
    source: str
    data: npt.NDArray[np.float32]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (stored in the checkpoint)."""

    seed: int = 0
    lr: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 100
    steps_per_epoch: int = 500
    patience: int = 8
    # Halve the learning rate after this many epochs without improvement.
    lr_patience: int = 3
    min_lr: float = 1.25e-4
    pinball_weight: float = 1.0
    # Validation windows per trace (evenly spaced), to bound estimate_loss time.
    val_windows_per_trace: int = 64
    grad_clip: float = 1.0
    # Validate and keep an exponential moving average of the weights (0: off).
    # 0.999 won on the validation split (macro nMAE 0.968 vs 0.972 x last
    # value, best val loss 0.3146 vs 0.3155): it trains longer before early
    # stopping but each step's noise is averaged out.
    ema_decay: float = 0.999
    # One thread: a batch-32 LSTM step is no faster on two (7.5 vs 7.4 ms
    # measured here), and two threads spin against each other when the
    # machine is busy (a 40x slowdown measured with other jobs running).
    threads: int = 1
    # Optional cap in seconds, 0 = off (the default): a run it stops depends
    # on the machine's speed, so the same command would give another model.
    time_budget_s: float = 0.0
    source_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    """What the run measured, epoch by epoch."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_point: list[float] = field(default_factory=list)
    val_coverage: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    initial_val_loss: float = math.nan
    best_epoch: int = 0
    best_val_loss: float = math.inf
    stopped: str = ""
    seconds: float = 0.0
    steps: int = 0

    def to_json(self) -> dict[str, Any]:
        """The history as a JSON-ready dict."""
        return asdict(self)


class TraceBank:
    """All traces of one split in one array, with per-trace offsets.

    A window is addressed by its first row ``pos`` in the concatenated data;
    its target is the bandwidth at ``pos + WINDOW``. Only windows whose target
    lies inside the same trace are ever addressed.
    """

    def __init__(self, traces: Sequence[_TraceLike], source_weights: Mapping[str, float]) -> None:
        traces = [t for t in traces if len(t.data) > WINDOW]
        assert traces, "no trace has more than WINDOW steps"
        self.data = np.concatenate([t.data for t in traces]).astype(np.float32)
        lengths = np.array([len(t.data) for t in traces])
        self.start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.n_windows = lengths - WINDOW
        self.scale = np.array(
            [max(float(t.data[:, BW].mean()), SCALE_FLOOR_MBPS) for t in traces], dtype=np.float32
        )
        self.sources = sorted({t.source for t in traces})
        self.trace_source = np.array([self.sources.index(t.source) for t in traces])
        self.by_source = [np.flatnonzero(self.trace_source == s) for s in range(len(self.sources))]
        w = np.array([source_weights.get(s, 1.0) for s in self.sources], dtype=np.float64)
        assert (w >= 0).all() and w.sum() > 0, "source weights must be >= 0, not all 0"
        self.source_p = w / w.sum()
        # Which rank holds each trace's data (all 0 in a lone process).
        self.owner = np.zeros(len(traces), dtype=np.int64)

    @property
    def trace_p(self) -> npt.NDArray[np.float64]:
        """The chance that one sampled row comes from each trace."""
        members = np.array([len(self.by_source[s]) for s in self.trace_source])
        return np.asarray(self.source_p[self.trace_source] / members, dtype=np.float64)

    def shard(self, owner: npt.NDArray[np.int64], rank: int) -> None:
        """Keep only the data of the traces ``owner`` gives to ``rank``; the
        metadata of every trace stays, so every rank draws the same batches."""
        lengths = self.n_windows + WINDOW
        mine = np.flatnonzero(owner == rank)
        parts = [self.data[self.start[t] : self.start[t] + lengths[t]] for t in mine]
        self.data = np.concatenate(parts) if parts else self.data[:0]
        start = np.full(len(owner), -1, dtype=np.int64)
        start[mine] = np.concatenate([[0], np.cumsum(lengths[mine])[:-1]]).astype(np.int64)
        self.start, self.owner = start, np.asarray(owner, dtype=np.int64)

    def gather(
        self, trace: npt.NDArray[np.int64], offset: npt.NDArray[np.int64]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows ``[B, WINDOW, WIDTH]``, targets ``[B]`` and trace scales ``[B]``."""
        assert (self.start[trace] >= 0).all(), "a trace of another rank's shard"
        pos = self.start[trace] + offset
        x = self.data[pos[:, None] + np.arange(WINDOW)[None, :]]
        y = self.data[pos + WINDOW, BW]
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(self.scale[trace])

    def sample(
        self, rng: np.random.Generator, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A batch drawn source -> trace -> window, each level uniform."""
        return self.gather(*self.draw(rng, batch_size))

    def draw(
        self, rng: np.random.Generator, batch_size: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The trace and offset of each row of a batch (see :meth:`sample`):
        metadata only, the same on every rank for the same generator."""
        src = rng.choice(len(self.sources), size=batch_size, p=self.source_p)
        pick = rng.random(batch_size)
        trace = np.array(
            [
                self.by_source[s][int(u * len(self.by_source[s]))]
                for s, u in zip(src, pick, strict=True)
            ]
        )
        offset = (rng.random(batch_size) * self.n_windows[trace]).astype(np.int64)
        return trace, offset

    def fixed(
        self, per_trace: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to ``per_trace`` evenly spaced windows of every trace (of this
        rank's shard), with the weight of each window so that every source (by
        its weight), every trace of a source and every window of a trace weigh
        the same over all the ranks' windows."""
        # Empty leading parts: a rank may hold no validation trace at all.
        traces, offsets, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0)]
        for s, members in enumerate(self.by_source):
            for t in members:
                if self.start[t] < 0:
                    continue
                n = int(min(per_trace, self.n_windows[t]))
                off = np.linspace(0, self.n_windows[t] - 1, n).astype(np.int64)
                traces.append(np.full(n, t))
                offsets.append(off)
                weights.append(np.full(n, self.source_p[s] / len(members) / n))
        x, y, scale = self.gather(np.concatenate(traces), np.concatenate(offsets))
        return x, y, scale, torch.from_numpy(np.concatenate(weights).astype(np.float32))


def forecaster_loss(
    q_mbps: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    cfg: ForecasterConfig,
    pinball_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window loss and its point part, both ``[B]``.

    Args:
        q_mbps: ``[B, 3]`` low / median / high forecasts in Mbit/s.
        y: ``[B]`` actual next-step bandwidth in Mbit/s.
        scale: ``[B]`` mean bandwidth of each window's trace.
        cfg: the model config (its quantile levels).
        pinball_weight: weight of the two quantile heads' pinball losses.
    """
    e = (y[:, None] - q_mbps) / scale[:, None]
    point = e[:, 1].abs()
    loss = point
    for col, tau in ((0, cfg.low_quantile), (2, cfg.high_quantile)):
        loss = loss + pinball_weight * torch.maximum(tau * e[:, col], (tau - 1) * e[:, col])
    return loss, point


def _forward_mbps(model: Forecaster, x: torch.Tensor) -> torch.Tensor:
    return model.to_mbps(model.forward_rel(x), x)


def train_forecaster(
    train_traces: Sequence[_TraceLike],
    val_traces: Sequence[_TraceLike],
    cfg: TrainConfig | None = None,
    model_cfg: ForecasterConfig | None = None,
    progress: bool = True,
    *,
    member: int | None = None,
    init_from: Forecaster | None = None,
) -> tuple[Forecaster, History]:
    """Train a :class:`Forecaster`; return the best-on-validation weights.

    Args:
        train_traces: traces to sample training windows from.
        val_traces: traces for early stopping (never trained on).
        cfg: loop settings; defaults to :class:`TrainConfig`.
        model_cfg: architecture; defaults to :class:`ForecasterConfig`.
        progress: show tqdm progress bars.
        member: which of several members trained side by side this is (its
            progress bar's name and row); None for a lone model.
        init_from: start from a copy of these weights (fine-tuning; its
            config wins over ``model_cfg``) instead of a fresh network.

    Returns:
        ``(model in eval mode, history)``.
    """
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    # Every rank seeds alike: the same initial weights, batches and dropout masks.
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = copy.deepcopy(init_from) if init_from is not None else Forecaster(model_cfg)
    train = TraceBank(train_traces, cfg.source_weights)
    val = TraceBank(val_traces, cfg.source_weights)
    rank, world = distributed.rank(), distributed.world_size()
    batch = ShardedBatch()
    if world > 1:
        train.shard(assign_shards(train.trace_p, world), rank)
        per_trace = np.minimum(val.n_windows, cfg.val_windows_per_trace)
        val.shard(assign_shards(per_trace, world), rank)
        shard_modules(model, batch)
    progress = progress and distributed.is_main()
    val_x, val_y, val_s, val_w = val.fixed(cfg.val_windows_per_trace)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # The weights that are validated and kept: an exponential moving average
    # of the trained ones (batch-norm statistics included) when ema_decay > 0.
    ema = (
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
        if cfg.ema_decay > 0
        else None
    )
    kept: Forecaster = ema.module if ema is not None else model  # type: ignore[assignment]

    @torch.no_grad()
    def estimate_loss() -> tuple[float, float, float]:
        """Weighted validation loss, its point part, and 80% coverage."""
        kept.eval()
        q = torch.cat([_forward_mbps(kept, xb) for xb in val_x.split(8192)])
        loss, point = forecaster_loss(q, val_y, val_s, kept.cfg, cfg.pinball_weight)
        inside = ((val_y >= q[:, 0]) & (val_y <= q[:, 2])).float()
        model.train()
        # Summed over the ranks' shards: every rank takes the same decisions.
        sums = torch.stack([(v * val_w).sum() for v in (loss, point, inside)]).double()
        total = distributed.all_reduce_sum(sums).tolist()
        return total[0], total[1], total[2]

    hist = History()
    best_state = copy.deepcopy(kept.state_dict())
    since_best = since_lr = 0
    t0 = time.monotonic()
    hist.initial_val_loss = estimate_loss()[0]
    if init_from is not None:  # fine-tuning keeps the start unless an epoch beats it
        hist.best_val_loss = hist.initial_val_loss
    model.train()
    epochs = tqdm(
        range(1, cfg.max_epochs + 1),
        desc="forecaster" if member is None else f"forecaster {member}",
        position=member or 0,
        disable=not progress,
    )
    for epoch in epochs:
        running = 0.0
        steps = tqdm(
            range(cfg.steps_per_epoch),
            desc=f"epoch {epoch}",
            leave=False,
            # Side-by-side members show their epoch counters only.
            disable=not progress or member is not None,
        )
        for _ in steps:
            trace, offset = train.draw(rng, cfg.batch_size)
            mine = np.flatnonzero(train.owner[trace] == rank)
            batch.set(cfg.batch_size, mine)
            xb, yb, sb = train.gather(trace[mine], offset[mine])
            loss, _ = forecaster_loss(
                _forward_mbps(model, xb), yb, sb, model.cfg, cfg.pinball_weight
            )
            # This rank's part of the global batch's mean; summed below.
            loss = loss.mean() if world == 1 else loss.sum() / cfg.batch_size
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_grads(model.parameters())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            running += loss.item()
            hist.steps += 1
        if world > 1:
            running = float(distributed.all_reduce_sum(torch.tensor([running]).double()))
        val_loss, val_point, val_cov = estimate_loss()
        lr = opt.param_groups[0]["lr"]
        hist.epoch.append(epoch)
        hist.train_loss.append(running / cfg.steps_per_epoch)
        hist.val_loss.append(val_loss)
        hist.val_point.append(val_point)
        hist.val_coverage.append(val_cov)
        hist.lr.append(lr)
        epochs.set_postfix(
            train=f"{running / cfg.steps_per_epoch:.4f}",
            val=f"{val_loss:.4f}",
            cov=f"{val_cov:.3f}",
            best=hist.best_epoch,
        )
        if val_loss < hist.best_val_loss:
            hist.best_val_loss, hist.best_epoch = val_loss, epoch
            best_state = copy.deepcopy(kept.state_dict())
            since_best = since_lr = 0
        else:
            since_best += 1
            since_lr += 1
        if since_lr >= cfg.lr_patience and lr > cfg.min_lr:
            for group in opt.param_groups:
                group["lr"] = max(lr / 2, cfg.min_lr)
            since_lr = 0
        if since_best >= cfg.patience:
            hist.stopped = f"early stop: no val improvement for {cfg.patience} epochs"
            break
        if cfg.time_budget_s > 0 and _past_budget(time.monotonic() - t0, cfg.time_budget_s):
            hist.stopped = f"time budget of {cfg.time_budget_s:.0f} s reached"
            break
    else:
        hist.stopped = f"max_epochs={cfg.max_epochs} reached"
    hist.seconds = time.monotonic() - t0
    model.load_state_dict(best_state)
    unshard_modules(model)
    model.eval()
    return model, hist


def _past_budget(elapsed_s: float, budget_s: float) -> bool:
    """Whether any rank is past the time budget (all ranks stop together)."""
    late = torch.tensor([1.0 if elapsed_s > budget_s else 0.0])
    return bool(distributed.all_reduce_sum(late).item() > 0)


@torch.no_grad()
def calibrate_interval(
    model: Forecaster,
    traces: Sequence[_TraceLike],
    target: float = 0.8,
    exclude_prefix: str = "synthetic",
) -> float:
    """Set ``model.cfg.interval_scale`` so the interval covers ``target`` of
    the actuals, macro-averaged over sources, on ``traces`` (the validation
    split: never the test split).

    Coverage is monotone in the scale, so each window's smallest covering
    scale is computed once (in the model's relative log space, where the
    heads live) and the macro coverage curve is searched by bisection.
    Sources starting with ``exclude_prefix`` are left out when others exist.

    Returns:
        The scale set on the model.
    """
    from trainer.data.windows import make_windows

    real = [t for t in traces if not t.source.startswith(exclude_prefix)] or list(traces)
    w = make_windows(real)  # type: ignore[arg-type]
    if len(w) == 0:
        return model.cfg.interval_scale
    model.cfg.interval_scale = 1.0
    model.eval()
    x = torch.from_numpy(w.x)
    q = torch.cat([model.forward_rel(xb) for xb in x.split(8192)])
    t = model.target_rel(torch.from_numpy(w.y), x)[:, 0]
    mid, below, above = q[:, 1], q[:, 1] - q[:, 0], q[:, 2] - q[:, 1]
    need = torch.where(t >= mid, (t - mid) / above, (mid - t) / below).numpy()
    src = np.array([real[i].source for i in w.trace])
    groups = [need[src == s] for s in sorted(set(src.tolist()))]

    def coverage(k: float) -> float:
        return float(np.mean([np.mean(g <= k) for g in groups]))

    lo, hi = 0.05, 20.0
    for _ in range(50):
        mid_k = math.sqrt(lo * hi)
        lo, hi = (mid_k, hi) if coverage(mid_k) < target else (lo, mid_k)
    model.cfg.interval_scale = float(hi)
    return model.cfg.interval_scale
