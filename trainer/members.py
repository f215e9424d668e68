"""Ensemble members trained side by side, one process per core.

A shipped model may average several independently trained networks (the
forecaster's and the Q-network's ``members``): each is a full training run
with its own seed, selected on the validation split like a single model.
Both trainings run single-threaded (a small batch gains nothing from a second
thread), so on two cores two members train in the wall time of one.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from torch import nn

from trainer import distributed

__all__ = ["merge_members", "train_members"]

H = TypeVar("H")
M = TypeVar("M", bound=nn.Module)


def merge_members(cls: type[M], models: Sequence[Any], **ignored: Any) -> M:
    """One ``cls`` model holding the members of ``models``, in eval mode.

    ``cls`` is built from a dataclass ``cfg`` with a ``members`` count and
    keeps its networks in ``self.members``. The configs must agree apart from
    ``members`` and the fields in ``ignored``, which take the given values.

    Raises:
        ValueError: the architectures differ.
    """
    base = replace(models[0].cfg, members=1, **ignored)
    if any(replace(m.cfg, members=1, **ignored) != base for m in models[1:]):
        raise ValueError(f"merge: the {cls.__name__} architectures differ")
    merged = cls(replace(base, members=sum(m.cfg.members for m in models)))
    merged.members = nn.ModuleList(copy.deepcopy(x) for m in models for x in m.members)
    return merged.eval()


def train_members(
    fn: Callable[..., tuple[M, H]],
    jobs: Sequence[dict[str, Any]],
    merge: Callable[[list[M]], M],
) -> tuple[M, list[H]]:
    """Train one network per job, ``fn(**job, member=i)``, each in its own
    process when there are several (at most one per core at a time), and
    ``merge`` them; a lone job runs here with ``member=None`` and is not merged.

    ``fn`` returns ``(network, history)``. It must be a module-level function
    and its arguments and result picklable: the processes are spawned, not
    forked (a fork of a process whose torch thread pools have started can
    deadlock). Under torchrun the members train one after the other in this
    process, each data-parallel over the ranks (a spawned child is in no
    process group).

    Returns:
        The model and each job's history, in job order.
    """
    if len(jobs) == 1:
        model, history = fn(**jobs[0], member=None)
        return model, [history]
    if distributed.world_size() > 1:
        trained = [fn(**job, member=i) for i, job in enumerate(jobs)]
        return merge([m for m, _ in trained]), [h for _, h in trained]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, **job, member=i) for i, job in enumerate(jobs)]
        trained = [f.result() for f in futures]
    return merge([m for m, _ in trained]), [h for _, h in trained]
