"""Tests for trainer.data.windows: window shapes and targets, group-safe splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bwpredd.schema import BW, FEATURES, WINDOW
from bwpredd.traces import Trace, load_traces
from trainer.data.synthetic import synthetic_traces
from trainer.data.traces import default_traces_dir
from trainer.data.windows import make_windows, split_summary, split_traces


def _trace(n: int, name: str = "t", source: str = "s", group: str | None = None) -> Trace:
    """A hand-made trace whose bandwidth at step i is 100 + i and latency is i."""
    data = np.zeros((n, 4), dtype=np.float32)
    data[:, BW] = 100 + np.arange(n)
    data[:, FEATURES.index("latency_ms")] = np.arange(n)
    return Trace(
        source=source,
        name=name,
        group=group or name,
        step_s=1.0,
        data=data,
        measured=("bandwidth_mbps",),
    )


class TestMakeWindows:
    def test_shapes_and_targets(self) -> None:
        """A 13-step trace gives 3 windows of [10, 4] whose target is the next bandwidth."""
        w = make_windows([_trace(13)])
        assert w.x.shape == (3, WINDOW, 4) and w.x.dtype == np.float32
        assert w.y.shape == (3,) and w.y.dtype == np.float32
        np.testing.assert_array_equal(w.y, [110.0, 111.0, 112.0])
        np.testing.assert_array_equal(w.x[0, :, BW], 100 + np.arange(10))
        np.testing.assert_array_equal(w.x[2, :, BW], 102 + np.arange(10))
        np.testing.assert_array_equal(w.x[1, :, 0], np.arange(1, 11))  # every feature windowed
        assert w.trace.dtype == np.int32 and w.trace_mean.dtype == np.float32

    def test_trace_index_and_mean(self) -> None:
        """Windows carry their trace's index and the whole trace's mean bandwidth."""
        w = make_windows([_trace(11, "a"), _trace(5, "short"), _trace(12, "b")])
        np.testing.assert_array_equal(w.trace, [0, 2, 2])  # the 5-step trace gives none
        np.testing.assert_allclose(w.trace_mean, [105.0, 105.5, 105.5])

    def test_stride(self) -> None:
        """stride=3 starts windows every 3 steps and never runs past the trace."""
        w = make_windows([_trace(20)], stride=3)
        # starts 0, 3, 6, 9 (start 9 needs rows 9..19: the last row is the target)
        np.testing.assert_array_equal(w.y, [110.0, 113.0, 116.0, 119.0])
        np.testing.assert_array_equal(w.x[3, 0, BW], 109.0)
        with pytest.raises(ValueError, match="stride"):
            make_windows([_trace(20)], stride=0)

    def test_empty(self) -> None:
        """No usable trace gives empty arrays of the right shapes."""
        w = make_windows([_trace(10)])
        assert w.x.shape == (0, WINDOW, 4) and len(w) == 0


def _check_split(traces: list[Trace], parts: tuple[list[Trace], ...]) -> None:
    names = [t.name for part in parts for t in part]
    assert sorted(names) == sorted(t.name for t in traces)  # every trace exactly once
    groups = [{(t.source, t.group) for t in part} for part in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])


class TestSplitTraces:
    def test_groups_never_in_two_splits(self) -> None:
        """Traces sharing a group stay together and every trace lands in one split."""
        traces = [_trace(20, f"g{g}/t{k}", group=f"g{g}") for g in range(10) for k in range(3)]
        parts = split_traces(traces, seed=1)
        _check_split(traces, parts)
        # 10 groups: round(1.5) = 2 each for val and test, the rest train.
        assert [len({t.group for t in p}) for p in parts] == [6, 2, 2]
        assert [len(p) for p in parts] == [18, 6, 6]

    def test_every_source_in_every_split(self) -> None:
        """Each source with >= 3 groups is split on its own into all three splits."""
        traces = [_trace(20, f"{s}/{g}", source=s) for s in ("a", "b") for g in range(3)]
        traces += [_trace(20, f"c/{g}", source="c") for g in range(20)]
        train, val, test = split_traces(traces, seed=0)
        for part in (train, val, test):
            assert {t.source for t in part} == {"a", "b", "c"}
        assert [sum(t.source == "c" for t in p) for p in (train, val, test)] == [14, 3, 3]

    def test_small_sources(self) -> None:
        """One group goes to train; two groups to train and test."""
        traces = [_trace(20, "one/0", source="one")]
        traces += [_trace(20, f"two/{g}", source="two") for g in range(2)]
        train, val, test = split_traces(traces)
        assert [t.name for t in train if t.source == "one"] == ["one/0"]
        assert not val
        assert [sum(t.source == "two" for t in p) for p in (train, test)] == [1, 1]

    def test_deterministic_from_seed_and_order_free(self) -> None:
        """The same seed gives the same split, whatever the input order."""
        traces = [_trace(20, f"t{k}") for k in range(30)]
        a = split_traces(traces, seed=5)
        b = split_traces(list(reversed(traces)), seed=5)
        c = split_traces(traces, seed=6)
        assert [{t.name for t in p} for p in a] == [{t.name for t in p} for p in b]
        assert [{t.name for t in p} for p in a] != [{t.name for t in p} for p in c]

    def test_bad_fractions(self) -> None:
        """Fractions that do not sum to 1 are rejected."""
        with pytest.raises(ValueError, match="fractions"):
            split_traces([_trace(20)], fractions=(0.5, 0.2, 0.2))

    def test_real_groups_respected(self) -> None:
        """On real Pantheon and mahimahi traces no folder or up/down pair is split."""
        root = default_traces_dir()
        if not root.is_dir():
            pytest.skip(f"traces directory {root} not found")
        traces: list[Trace] = []
        for sub in ("pantheon_genet/cellular", "mahimahi_cellular"):
            if (root / sub).is_dir():
                traces += load_traces(root / sub).traces
        if not traces:
            pytest.skip("no pantheon_genet or mahimahi_cellular")
        parts = split_traces(traces, seed=0)
        _check_split(traces, parts)
        for part in parts:
            assert {t.source for t in part} == {t.source for t in traces}


class TestSplitSummary:
    def test_counts_and_json(self) -> None:
        """The summary counts traces, groups and steps per source and split, JSON-able."""
        traces = synthetic_traces(seed=0, n_traces=20, length=30)
        train, val, test = split_traces(traces, seed=0)
        summary = split_summary(train, val, test)
        assert set(summary) == {"synthetic_datacenter", "synthetic_internet"}
        dc = summary["synthetic_datacenter"]
        assert [dc[s]["traces"] for s in ("train", "val", "test")] == [6, 2, 2]
        assert sum(dc[s]["steps"] for s in ("train", "val", "test")) == 10 * 30
        assert dc["train"]["groups"] == dc["train"]["traces"]
        json.dumps(summary)

    def test_absent_source_reads_zero(self) -> None:
        """A source missing from a split shows zeros there."""
        summary = split_summary([_trace(20, "a", source="x")], [], [])
        assert summary["x"]["val"] == {"traces": 0, "groups": 0, "steps": 0}
        assert summary["x"]["train"] == {"traces": 1, "groups": 1, "steps": 20}
