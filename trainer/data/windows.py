"""Cut traces into model windows and split traces into train/val/test folds.

One job: turn a list of :class:`~bwpredd.traces.Trace` into the
``[N, WINDOW, WIDTH]`` raw-unit windows the forecaster reads (target: the next step's
bandwidth), and split traces by fold group so no session, route+day, Pantheon
folder or mahimahi pair is ever in two splits.

Traces that carry absolute time (``start_s``: a daemon's recordings) are
split by time instead, within each group (one peer of one node): the first
``fractions[0]`` of the peer's time span is train, the next ``fractions[1]``
validation, the most recent ``fractions[2]`` test (:func:`time_cuts`,
:func:`split_by_time`). Every peer is in every split, and the model is
tested on the part of each link it has not seen yet, which is what serving
it will ask. A piece after a cut starts with the ``WINDOW`` samples before
the cut as history, so no sample is lost as a target and none is a target in
two splits.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bwpredd.schema import BW, WIDTH, WINDOW
from bwpredd.traces import Trace

__all__ = [
    "SPLIT_NAMES",
    "Windows",
    "make_windows",
    "split_by_time",
    "split_summary",
    "split_traces",
    "time_cuts",
]

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


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three shares >= 0 summing to 1, got {fractions}")


def time_cuts(
    traces: Sequence[Trace], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, tuple[float, float]]:
    """Where each group of the timed traces (``start_s`` set) is cut.

    Args:
        traces: any traces; those without ``start_s`` are ignored.
        fractions: shares of each group's time span for (train, val, test).

    Returns:
        ``{group: (val_from, test_from)}`` in Unix seconds: a sample at
        ``t < val_from`` is train, ``t >= test_from`` test, validation between.

    Raises:
        ValueError: bad ``fractions``.
    """
    _check_fractions(fractions)
    spans: dict[str, list[float]] = {}
    for tr in traces:
        if tr.start_s is None or tr.time_s is None or len(tr) == 0:
            continue
        first, last = tr.start_s, tr.start_s + float(tr.time_s[-1])
        span = spans.setdefault(tr.group, [first, last])
        span[0], span[1] = min(span[0], first), max(span[1], last)
    f_train, f_val, _ = fractions
    return {
        g: (lo + f_train * (hi - lo), lo + (f_train + f_val) * (hi - lo))
        for g, (lo, hi) in sorted(spans.items())
    }


def split_by_time(
    trace: Trace, cut: tuple[float, float]
) -> tuple[Trace | None, Trace | None, Trace | None]:
    """Cut a timed trace at ``cut = (val_from, test_from)``.

    Returns:
        ``(train, val, test)`` pieces, None where a piece would hold no
        window. The val and test pieces start ``WINDOW`` samples before their
        cut (history only: those samples are never a target there).

    Raises:
        ValueError: the trace has no ``start_s`` / ``time_s``.
    """
    if trace.start_s is None or trace.time_s is None:
        raise ValueError(f"{trace.name}: not a timed trace (no start_s)")
    t = trace.start_s + np.asarray(trace.time_s, dtype=np.float64)
    i_val, i_test = (int(np.searchsorted(t, c, side="left")) for c in cut)
    rows = ((0, i_val), (max(0, i_val - WINDOW), i_test), (max(0, i_test - WINDOW), len(t)))
    out: list[Trace | None] = []
    for a, b in rows:
        if b - a <= WINDOW:
            out.append(None)
        elif (a, b) == (0, len(t)):
            out.append(trace)
        else:
            time_s = trace.time_s[a:b]
            orc = trace.oracle_next_bw
            out.append(
                replace(
                    trace,
                    data=trace.data[a:b],
                    time_s=time_s - time_s[0],
                    start_s=float(t[a]),
                    oracle_next_bw=None if orc is None else orc[a:b],
                )
            )
    return out[0], out[1], out[2]


def split_traces(
    traces: Sequence[Trace],
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    *,
    cuts: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[list[Trace], list[Trace], list[Trace]]:
    """Split traces into train/val/test by fold group, each source on its own.

    Each source's groups are shuffled with a generator seeded from ``seed`` and
    the source name, then cut by ``fractions`` of the group count: a source
    with >= 3 groups lands in every split with a non-zero fraction, one with
    2 groups in train and test, one with 1 group in train only. A group is
    never in two splits and a trace is never cut. The order of ``traces``
    within each split is kept.

    Timed traces (``start_s`` set: recordings) are split by time within
    their group instead (:func:`time_cuts`, :func:`split_by_time`): each
    lands in every split its time span reaches.

    Args:
        traces: the traces to split.
        fractions: shares of groups for (train, val, test); must sum to 1.
        seed: makes the split reproducible.
        cuts: the timed groups' cuts (default: :func:`time_cuts` of
            ``traces``); a group missing from them has appeared since they
            were made and is wholly test.

    Returns:
        ``(train, val, test)`` lists of traces.

    Raises:
        ValueError: bad ``fractions``.
    """
    _check_fractions(fractions)
    if cuts is None:
        cuts = time_cuts(traces, fractions)
    groups_by_source: dict[str, list[str]] = {}
    for tr in traces:
        if tr.start_s is not None:
            continue
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
    unseen = (-np.inf, -np.inf)  # a group without cuts: everything is test
    for tr in traces:
        if tr.start_s is None:
            out[split_of[(tr.source, tr.group)]].append(tr)
            continue
        for part, piece in zip(out, split_by_time(tr, cuts.get(tr.group, unseen)), strict=True):
            if piece is not None:
                part.append(piece)
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
