"""Cut traces into model windows and split traces into train/val/test folds.

One job: turn a list of :class:`~bwpredd.traces.Trace` into the
``[N, WINDOW, WIDTH]`` raw-unit windows the forecaster reads (target: the next step's
bandwidth), and split traces by fold group so no session, route+day, Pantheon
folder or mahimahi pair is ever in two splits.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bwpredd.schema import BW, WIDTH, WINDOW
from bwpredd.traces import Trace

__all__ = ["SPLIT_NAMES", "Windows", "make_windows", "split_summary", "split_traces"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class Windows:
    """Windows of ``WINDOW`` steps with the next step's bandwidth as target.

    Attributes:
        x: ``float32 [N, WINDOW, WIDTH]`` raw units, in the order of :mod:`bwpredd.schema`.
        y: ``float32 [N]`` bandwidth (Mbit/s) of the step after the window.
        trace: ``int32 [N]`` index into the traces given to :func:`make_windows`.
        trace_mean: ``float32 [N]`` mean bandwidth of that whole trace.
    """

    x: np.ndarray
    y: np.ndarray
    trace: np.ndarray
    trace_mean: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


def make_windows(traces: Sequence[Trace], stride: int = 1) -> Windows:
    """Cut every trace into windows of ``WINDOW`` steps and their next-step target.

    Window ``i`` of a trace is ``data[i*stride : i*stride + WINDOW]`` and its
    target is ``data[i*stride + WINDOW, bandwidth]``. Traces shorter than
    ``WINDOW + 1`` steps give no windows.

    Args:
        traces: the traces; ``Windows.trace`` indexes into this sequence.
        stride: steps between the starts of consecutive windows (>= 1).

    Returns:
        The windows of all traces, concatenated in trace order.

    Raises:
        ValueError: ``stride`` < 1.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    xs, ys, idx, means = [], [], [], []
    for i, tr in enumerate(traces):
        data = np.asarray(tr.data, dtype=np.float32)
        n = (data.shape[0] - WINDOW - 1) // stride + 1 if data.shape[0] > WINDOW else 0
        if n <= 0:
            continue
        # A strided view, then one copy of the windows we keep.
        view = np.lib.stride_tricks.sliding_window_view(data[:-1], WINDOW, axis=0)
        xs.append(np.ascontiguousarray(view[::stride][:n].transpose(0, 2, 1)))
        ys.append(data[WINDOW::stride, BW][:n])
        idx.append(np.full(n, i, dtype=np.int32))
        means.append(np.full(n, data[:, BW].mean(dtype=np.float64), dtype=np.float32))
    if not xs:
        return Windows(
            x=np.zeros((0, WINDOW, WIDTH), np.float32),
            y=np.zeros(0, np.float32),
            trace=np.zeros(0, np.int32),
            trace_mean=np.zeros(0, np.float32),
        )
    return Windows(
        x=np.concatenate(xs),
        y=np.concatenate(ys).astype(np.float32),
        trace=np.concatenate(idx),
        trace_mean=np.concatenate(means),
    )


def _split_counts(n_groups: int, fractions: tuple[float, float, float]) -> tuple[int, int, int]:
    """How many groups go to train/val/test for one source."""
    if n_groups == 1:
        return 1, 0, 0
    if n_groups == 2:
        # Too few for three folds: an honest test set matters more than early stopping.
        return 1, 0, 1
    _, f_val, f_test = fractions
    n_val = max(1, round(n_groups * f_val)) if f_val > 0 else 0
    n_test = max(1, round(n_groups * f_test)) if f_test > 0 else 0
    while n_groups - n_val - n_test < 1:  # train always keeps a group
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_groups - n_val - n_test, n_val, n_test


def split_traces(
    traces: Sequence[Trace],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> tuple[list[Trace], list[Trace], list[Trace]]:
    """Split traces into train/val/test by fold group, each source on its own.

    Each source's groups are shuffled with a generator seeded from ``seed`` and
    the source name, then cut by ``fractions`` of the group count: a source
    with >= 3 groups lands in every split with a non-zero fraction, one with
    2 groups in train and test, one with 1 group in train only. A group is
    never in two splits and a trace is never cut. The order of ``traces``
    within each split is kept.

    Args:
        traces: the traces to split.
        fractions: shares of groups for (train, val, test); must sum to 1.
        seed: makes the split reproducible.

    Returns:
        ``(train, val, test)`` lists of traces.

    Raises:
        ValueError: bad ``fractions``.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three shares >= 0 summing to 1, got {fractions}")
    groups_by_source: dict[str, list[str]] = {}
    for tr in traces:
        groups = groups_by_source.setdefault(tr.source, [])
        if tr.group not in groups:
            groups.append(tr.group)
    split_of: dict[tuple[str, str], int] = {}
    for source, groups in groups_by_source.items():
        # crc32, not hash(): str hashes change between processes.
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        # Sorted first so the split depends on the set of groups, not the input order.
        ordered = sorted(groups)
        order = [ordered[i] for i in rng.permutation(len(ordered))]
        n_train, n_val, _ = _split_counts(len(groups), fractions)
        for k, g in enumerate(order):
            split_of[(source, g)] = 0 if k < n_train else (1 if k < n_train + n_val else 2)
    out: tuple[list[Trace], list[Trace], list[Trace]] = ([], [], [])
    for tr in traces:
        out[split_of[(tr.source, tr.group)]].append(tr)
    return out


def split_summary(
    train: Sequence[Trace], val: Sequence[Trace], test: Sequence[Trace]
) -> dict[str, Any]:
    """Per source, how many traces, groups and steps each split holds (JSON-able).

    Args:
        train: the training traces.
        val: the validation traces.
        test: the test traces.

    Returns:
        ``{source: {"train": {"traces", "groups", "steps"}, "val": ..., "test": ...}}``
        with every source present in every split entry (zeros where absent).
    """
    sources = sorted({t.source for part in (train, val, test) for t in part})
    out: dict[str, Any] = {}
    for source in sources:
        entry: dict[str, dict[str, int]] = {}
        for split_name, part in zip(SPLIT_NAMES, (train, val, test), strict=True):
            mine = [t for t in part if t.source == source]
            entry[split_name] = {
                "traces": len(mine),
                "groups": len({t.group for t in mine}),
                "steps": int(sum(len(t.data) for t in mine)),
            }
        out[source] = entry
    return out
