"""Ensemble members trained side by side, one process per core.

A shipped model may average several independently trained networks (the
forecaster's and the Q-network's ``members``): each is a full training run
with its own seed, selected on the validation split like a single model.
Both trainings run single-threaded (a small batch gains nothing from a second
thread), so on two cores two members train in the wall time of one.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

__all__ = ["run_members"]

T = TypeVar("T")


def run_members(fn: Callable[..., T], jobs: Sequence[dict[str, Any]]) -> list[T]:
    """``[fn(**job) for job in jobs]``, each job in its own process when
    there are several (at most one per core at a time).

    ``fn`` must be a module-level function and its arguments and result
    picklable: the processes are spawned, not forked (a fork of a process
    whose torch thread pools have started can deadlock).
    """
    if len(jobs) <= 1:
        return [fn(**job) for job in jobs]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(fn, **job) for job in jobs]
        return [f.result() for f in futures]
