"""Data parallelism that gives the same model on any number of ranks.

Every rank draws the same global batch (the same seeded generator over the
same trace metadata) and computes only the rows whose trace it owns
(:func:`assign_shards`). For the sum over ranks to be the single process's
step, the layers that look across a batch must see the global batch too:

- **dropout**: each mask is drawn for the whole global batch from the
  (identically seeded) default generator, exactly as ``nn.Dropout`` draws it
  in one process, and each rank keeps its own rows' part (:class:`ShardDropout`);
- **batch norm**: the batch mean and variance are sums over the ranks, with
  a differentiable all-reduce so the backward pass sees them as the one
  process's statistics (:class:`SyncBatchNorm1d`; torch's ``SyncBatchNorm``
  runs on GPUs only).

A step costs one all-reduce per batch norm each way plus one for the
gradients: seven for the forecaster's three batch norms.

:func:`shard_modules` swaps a model's ``nn.Dropout`` and ``nn.BatchNorm1d``
for these in place (same parameters, buffers and state-dict keys) and
:func:`unshard_modules` swaps them back. In eval mode both behave as the
originals. A lone process never swaps: it trains exactly as it always has.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import nn

from trainer import distributed

__all__ = [
    "ShardDropout",
    "ShardedBatch",
    "SyncBatchNorm1d",
    "assign_shards",
    "shard_modules",
    "unshard_modules",
]


def assign_shards(work: npt.ArrayLike, world: int) -> npt.NDArray[np.int64]:
    """The owning rank of each item: largest ``work`` first to the least
    loaded rank (ties to the lower item index and rank), so each rank gets
    about ``1 / world`` of the work whatever the items' sizes.

    Args:
        work: the expected work of each item (a trace's sampling probability,
            its validation windows).
        world: the number of ranks.

    Returns:
        ``int64 [len(work)]`` ranks in ``[0, world)``.
    """
    w = np.asarray(work, dtype=np.float64)
    owner = np.zeros(len(w), dtype=np.int64)
    load = np.zeros(world)
    for i in np.argsort(-w, kind="stable"):
        r = int(np.argmin(load))
        owner[i] = r
        load[r] += w[i]
    return owner


@dataclass
class ShardedBatch:
    """The current step's global batch size and the rows of it this rank holds."""

    size: int = 0
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    def set(self, size: int, rows: npt.NDArray[np.int64]) -> None:
        """Before each forward pass: ``rows`` (sorted) index the global batch."""
        self.size, self.rows = size, torch.from_numpy(np.asarray(rows, dtype=np.int64))


class ShardDropout(nn.Dropout):
    """``nn.Dropout`` whose training mask is the lone process's mask, sliced."""

    shard: ShardedBatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return super().forward(x)
        # As aten's CPU dropout: empty_like(input).bernoulli_(1 - p) on the
        # default generator, divided by 1 - p, but for the global batch. The
        # mask fills memory in order, so it takes the input's layout (an
        # LSTM's batch-first output is time-major in memory).
        keep = 1.0 - self.p
        noise = _empty_like_layout(x, (self.shard.size, *x.shape[1:]))
        noise.bernoulli_(keep).div_(keep)
        return x * noise[self.shard.rows]


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor of ``shape`` whose dimensions lie in memory in the
    order of ``x``'s (outermost first by stride; of equal strides, a size-1
    dimension is the inner one, as a size-1 dimension's stride is that of the
    dimension inside it)."""
    order = sorted(range(x.dim()), key=lambda d: (x.stride(d), x.shape[d] != 1), reverse=True)
    inverse = sorted(range(x.dim()), key=order.index)
    return torch.empty([shape[d] for d in order], dtype=x.dtype).permute(inverse)


class _AllReduceSum(torch.autograd.Function):
    """A sum over the ranks whose gradient is the sum of the ranks' gradients
    (each rank's loss depends on every rank's input through it)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _AllReduceSum.apply(x)  # type: ignore[no-untyped-call]
    return out


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on ``[N, C]`` or ``[N, C, T]`` whose training
    statistics are those of the global batch (one all-reduce each way)."""

    shard: ShardedBatch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims = [0] if x.dim() == 2 else [0, 2]
        shape = [1, -1] if x.dim() == 2 else [1, -1, 1]
        per_row = x.shape[2] if x.dim() == 3 else 1
        n = self.shard.size * per_row
        # One all-reduce of both sums (a collective costs more than the
        # arithmetic here); in float64, so E[x^2] - E[x]^2 loses nothing.
        xd = x.double()
        sums = _all_reduce(torch.cat([xd.sum(dim=dims), (xd * xd).sum(dim=dims)])) / n
        c = x.shape[1]
        mean, var = sums[:c].float(), (sums[c:] - sums[:c] ** 2).clamp(min=0).float()
        centred = x - mean.view(shape)
        with torch.no_grad():
            assert self.running_mean is not None and self.running_var is not None
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            m = self.momentum
            if m is None:  # a cumulative average, as nn.BatchNorm1d keeps it
                m = 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1, 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


_SWAPS: tuple[tuple[type[nn.Module], type[nn.Module]], ...] = (
    (nn.Dropout, ShardDropout),
    (nn.BatchNorm1d, SyncBatchNorm1d),
)


def shard_modules(model: nn.Module, batch: ShardedBatch) -> None:
    """Make ``model``'s dropout and batch norm global-batch-aware, in place.

    Only under a process group of more than one rank; a lone process keeps
    torch's own layers.
    """
    if distributed.world_size() <= 1:
        return
    for module in model.modules():
        for plain, sharded in _SWAPS:
            if type(module) is plain:
                # Same class layout, one overridden forward: a class swap keeps
                # the parameters, buffers and state-dict keys as they are.
                module.__class__ = sharded
                module.shard = batch  # type: ignore[assignment]


def unshard_modules(model: nn.Module) -> None:
    """Undo :func:`shard_modules` (before export, pickling or merging)."""
    for module in model.modules():
        for plain, sharded in _SWAPS:
            if type(module) is sharded:
                module.__class__ = plain
                del module.shard
