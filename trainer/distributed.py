"""torch.distributed for the trainer: one process, or data-parallel ranks under torchrun.

``torchrun`` starts every rank with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` in its environment; :func:`setup` joins them into one
process group on the gloo backend (CPU). Without those variables nothing is
initialised and every helper answers for a lone process (rank 0 of 1, no
backend), so the single-process command runs exactly as it always has.

What the ranks exchange is tensors only (no pickle, not even
``all_gather_object``): gradients and metrics by :func:`all_reduce_sum`,
strings by :func:`all_gather_str`.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "BACKEND",
    "all_gather_str",
    "all_reduce_grads",
    "all_reduce_sum",
    "backend",
    "barrier",
    "describe",
    "is_active",
    "is_main",
    "launched_by_torchrun",
    "rank",
    "setup",
    "shutdown",
    "state_digest",
    "world_size",
]

BACKEND = "gloo"
# What torchrun (and any env:// launcher) sets for every rank.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A rank waits this long for the others at a collective before failing: the
# forecaster's epochs are minutes, rank 0's evaluation between them seconds.
DEFAULT_TIMEOUT_S = 1800.0


def launched_by_torchrun(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the process was started by torchrun (its variables are all set)."""
    env = os.environ if environ is None else environ
    return all(name in env for name in TORCHRUN_VARIABLES)


def setup(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the process group torchrun describes; nothing without torchrun.

    Idempotent: a second call (``retrain`` calling into ``train``) is a no-op.

    Args:
        timeout_s: how long a collective waits for the other ranks.
    """
    if is_active() or not launched_by_torchrun():
        return
    dist.init_process_group(BACKEND, timeout=datetime.timedelta(seconds=timeout_s))


def is_active() -> bool:
    """Whether a process group is up (under torchrun, between setup and shutdown)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 for a lone process)."""
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    """How many ranks train together (1 for a lone process)."""
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    """Whether this process writes (checkpoints, reports, plots): rank 0."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend, or None for a lone process."""
    return str(dist.get_backend()) if is_active() else None


def describe() -> dict[str, int | str | None]:
    """``{"world_size", "backend"}`` for ``training_report.json``."""
    return {"world_size": world_size(), "backend": backend()}


def barrier() -> None:
    """Wait for every rank (nothing for a lone process)."""
    if is_active():
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Leave the process group (after a barrier unless ``wait`` is False, as
    on an error path, where the other ranks may never arrive)."""
    if not is_active():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returned for chaining.

    Every rank ends with the same bits (gloo's ring all-reduce gives each
    rank the same reduced result), which keeps decisions taken on the sum
    (early stopping, the learning rate) identical on every rank.
    """
    if is_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Sum every parameter's gradient over the ranks in one flat all-reduce.

    The caller's loss is already divided by the global batch size, so the sum
    is the gradient of the mean over the global batch. A parameter without a
    gradient on this rank counts as zeros.
    """
    if not is_active():
        return
    params = [p for p in params if p.requires_grad]
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
    )
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    at = 0
    for p in params:
        n = p.numel()
        p.grad = flat[at : at + n].view_as(p).clone()
        at += n


def all_gather_str(text: str) -> list[str]:
    """Every rank's ``text``, in rank order (UTF-8 bytes in uint8 tensors)."""
    if not is_active():
        return [text]
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    out = [torch.zeros(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(out, padded)
    return [bytes(o[: int(s)].tolist()).decode() for o, s in zip(out, sizes, strict=True)]


def state_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes, in
    name order): equal digests on two ranks mean bit-identical weights."""
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).numpy().tobytes())
    return h.hexdigest()


def finish(model: nn.Module, report: str) -> dict[str, Any]:
    """End the data-parallel part of a run: gather every rank's digest of
    ``model``, leave the process group, and on rank 0 warn (naming
    ``report``) when the digests differ. Returns the report's
    ``"distributed"`` block: :func:`describe` plus ``rank_weights_sha256``."""
    main = is_main()  # before leaving the group: afterwards every process is rank 0
    info: dict[str, Any] = {
        **describe(),
        "rank_weights_sha256": all_gather_str(state_digest(model)),
    }
    shutdown()
    if main and len(set(info["rank_weights_sha256"])) > 1:
        print(f"warning: the ranks' weights differ (see {report})", file=sys.stderr)
    return info
