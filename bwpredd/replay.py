"""Replay real trace files into a running daemon and score its live forecasts.

One job, client side (``bwpredctl replay``): each trace found under the given
paths (any format :func:`bwpredd.traces.load_traces` reads) is streamed,
sample by sample, into the daemon through PushSamples under the peer id
``replay/<trace name>``. Before each next sample the daemon is asked for a
Forecast; when the sample then arrives the forecast is scored against it, as
are two baselines computed here on the same running window of the last 10
samples: the last value and the EWMA (``bwpredd.baselines.ewma``, the alpha
the engine uses). Reported per file and pooled over all files: MAE (Mbit/s),
normalised MAE (sum |error| / sum actual), the share of steps within 10% of
the actual, and the daemon interval's coverage of the actual.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd.accuracy import nmae
from bwpredd.baselines import ewma
from bwpredd.client import Client, pb
from bwpredd.engine import BASELINE_ALPHA, SOURCE_LABELS
from bwpredd.safefs import open_trusted_dir
from bwpredd.schema import BW, FEATURES, OPTIONAL, TRACE_CSV_REQUIRED, WIDTH, WINDOW
from bwpredd.traces import Trace, load_traces

__all__ = ["FileReport", "ReplayError", "ReplayReport", "Scores", "peer_id_for", "replay"]

F64 = npt.NDArray[np.float64]
PREDICTORS = ("daemon", "last_value", "ewma")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:@/-]")
MAX_PEER_ID = 128
PLOT_MAX_FILES = 12
_UNKNOWN = (
    "no loader recognises this file (a generic CSV trace starts with the header "
    f"{','.join(TRACE_CSV_REQUIRED)}[,{','.join(OPTIONAL)}])"
)


class ReplayError(ValueError):
    """Replay cannot run (no traces found, a bad speedup, no matplotlib for a plot)."""


@dataclass
class Scores:
    """Accuracy of one predictor over some steps."""

    steps: int = 0
    mae: float = math.nan  # Mbit/s
    nmae: float = math.nan  # bwpredd.accuracy.nmae: sum |error| / sum actual
    within10: float = math.nan  # share of steps with |error| <= 10% of actual


@dataclass
class _Acc:
    """Running sums behind :class:`Scores`."""

    n: int = 0
    abs_err: float = 0.0
    actual: float = 0.0
    within: int = 0

    def add(self, forecast: F64, actual: F64) -> None:
        err = np.abs(forecast - actual)
        self.n += int(err.size)
        self.abs_err += float(err.sum())
        self.actual += float(np.abs(actual).sum())
        self.within += int((err <= 0.1 * np.abs(actual)).sum())

    def merge(self, other: _Acc) -> None:
        self.n += other.n
        self.abs_err += other.abs_err
        self.actual += other.actual
        self.within += other.within

    def scores(self) -> Scores:
        if self.n == 0:
            return Scores()
        return Scores(
            steps=self.n,
            mae=self.abs_err / self.n,
            nmae=nmae(self.abs_err, self.actual),
            within10=self.within / self.n,
        )


@dataclass
class FileReport:
    """One trace's replay."""

    name: str
    peer_id: str
    samples: int  # sent
    rejected: int  # refused by the daemon (not scored)
    scores: dict[str, Scores]  # predictor -> scores
    coverage: float  # share of scored steps inside the daemon's interval
    sources: dict[str, int]  # forecast source -> count
    # Series for the plot, one entry per scored step.
    actual: list[float] = field(default_factory=list, repr=False)
    point: list[float] = field(default_factory=list, repr=False)
    low: list[float] = field(default_factory=list, repr=False)
    high: list[float] = field(default_factory=list, repr=False)
    ewma: list[float] = field(default_factory=list, repr=False)


@dataclass
class ReplayReport:
    """Every file's replay and the pooled scores."""

    files: list[FileReport]
    overall: dict[str, Scores]
    coverage: float
    skipped: dict[str, str]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The report as plain values (no per-step series)."""
        keep = ("name", "peer_id", "samples", "rejected", "coverage", "sources")
        return {
            "files": [
                {
                    **{k: getattr(f, k) for k in keep},
                    "scores": {p: asdict(s) for p, s in f.scores.items()},
                }
                for f in self.files
            ],
            "overall": {p: asdict(s) for p, s in self.overall.items()},
            "coverage": self.coverage,
            "skipped": self.skipped,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        """A plain-text table: one row per file and predictor, then overall."""
        head = f"{'trace':<48} {'predictor':<10} {'steps':>6} {'MAE':>10} {'NMAE':>7} {'<=10%':>6}"
        lines = [head, "-" * len(head)]

        def rows(name: str, scores: dict[str, Scores], coverage: float) -> None:
            for i, p in enumerate(PREDICTORS):
                s = scores[p]
                label = _shorten(name, 48) if i == 0 else ""
                lines.append(
                    f"{label:<48} {p:<10} {s.steps:>6} {s.mae:>10.3f} "
                    f"{s.nmae:>7.3f} {s.within10:>6.1%}"
                )
            lines.append(f"{'':<48} {'coverage':<10} {coverage:>6.1%} (80% interval)")

        for f in self.files:
            rows(f.name, f.scores, f.coverage)
        lines.append("-" * len(head))
        rows(f"overall ({len(self.files)} traces)", self.overall, self.coverage)
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: " + ", ".join(sorted(self.skipped)[:5]))
        return "\n".join(lines)


def _shorten(s: str, n: int) -> str:
    return s if len(s) <= n else "..." + s[-(n - 3) :]


def peer_id_for(name: str, prefix: str = "replay/") -> str:
    """A valid peer id for a trace name: ``prefix + name`` with characters
    outside ``[A-Za-z0-9._:@/-]`` replaced by ``_``; past 128 characters the
    tail is kept behind a short hash, so ids stay unique.

    Args:
        name: the trace's name (its path relative to the traces root).
        prefix: what every replayed peer id starts with.
    """
    pid = prefix + _BAD_CHARS.sub("_", name)
    if len(pid) <= MAX_PEER_ID:
        return pid
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    keep = MAX_PEER_ID - len(prefix) - len(digest) - 1
    return f"{prefix}{digest}-{pid[-keep:]}"


def _load(paths: Sequence[Path]) -> tuple[list[Trace], dict[str, str]]:
    """Traces under every path."""
    traces: list[Trace] = []
    skipped: dict[str, str] = {}
    for path in paths:
        result = load_traces(path, min_steps=2)
        traces.extend(result.traces)
        skipped.update(result.skipped)
        skipped.update({str(p): _UNKNOWN for p in result.unknown})
    if not traces:
        # One line that says why each file gave nothing (the first few).
        why = [f"{name}: {reason}" for name, reason in skipped.items()]
        more = f"; {len(why) - 3} more" if len(why) > 3 else ""
        because = f" ({'; '.join(why[:3])}{more})" if why else ""
        raise ReplayError(f"no traces found in {', '.join(map(str, paths))}{because}")
    return traces, skipped


def _progress(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``(update(n), close())`` of a tqdm bar, a stderr counter, or nothing."""
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="sample", desc="replay", file=sys.stderr)
        return bar.update, bar.close
    except ImportError:
        done = [0, 0.0]

        def update(n: int) -> None:
            done[0] += n
            now = time.monotonic()
            if now - done[1] >= 1.0 or done[0] >= total:
                done[1] = now
                print(f"\rreplay: {int(done[0])}/{total} samples", end="", file=sys.stderr)

        def close() -> None:
            print(file=sys.stderr)

        return update, close


def _sample(peer_id: str, row: npt.NDArray[np.float32], measured: Iterable[str]) -> pb.Sample:
    """The trace row as a Sample with only the measured features set (the
    daemon carries forward or defaults the rest, as for a real worker)."""
    sample = pb.Sample(peer_id=peer_id)
    for f in measured:
        setattr(sample, f, float(row[FEATURES.index(f)]))
    return sample


def _replay_one(
    client: Client,
    trace: Trace,
    peer_id: str,
    speedup: float | None,
    update: Callable[[int], None],
) -> tuple[FileReport, dict[str, _Acc], tuple[int, int]]:
    data = np.asarray(trace.data, dtype=np.float32)
    bw = data[:, BW].astype(np.float64)
    t = np.asarray(trace.time_s, dtype=np.float64) if trace.time_s is not None else None
    measured = tuple(trace.measured)
    accs = {p: _Acc() for p in PREDICTORS}
    report = FileReport(trace.name, peer_id, 0, 0, {}, math.nan, {})
    inside = 0
    window = np.zeros((1, WINDOW, WIDTH), dtype=np.float32)
    count = 0  # real rows in the local window
    for i in range(len(bw)):
        if i > 0 and count > 0:
            (fc,) = client.forecast([peer_id])
            actual = bw[i : i + 1]
            local = np.array([window[0, -1, BW]], dtype=np.float64)
            avg = ewma(window, np.array([count]), alpha=BASELINE_ALPHA).astype(np.float64)
            accs["daemon"].add(np.array([fc.bandwidth_mbps]), actual)
            accs["last_value"].add(local, actual)
            accs["ewma"].add(avg, actual)
            inside += int(fc.low_mbps <= actual[0] <= fc.high_mbps)
            source = SOURCE_LABELS.get(fc.source, "unspecified")
            report.sources[source] = report.sources.get(source, 0) + 1
            report.actual.append(float(actual[0]))
            report.point.append(fc.bandwidth_mbps)
            report.low.append(fc.low_mbps)
            report.high.append(fc.high_mbps)
            report.ewma.append(float(avg[0]))
        if speedup is not None and i > 0:
            step = float(t[i] - t[i - 1]) if t is not None else float(trace.step_s)
            if step > 0:
                time.sleep(step / speedup)
        resp = client.push([_sample(peer_id, data[i], measured)])
        report.samples += 1
        if resp.accepted:
            window = np.roll(window, -1, axis=1)
            window[0, -1] = data[i]
            count = min(count + 1, WINDOW)
        else:
            report.rejected += 1
        update(1)
    report.scores = {p: a.scores() for p, a in accs.items()}
    scored = accs["daemon"].n
    report.coverage = inside / scored if scored else math.nan
    return report, accs, (inside, scored)


def replay(
    client: Client,
    paths: Sequence[Path | str],
    *,
    speedup: float | None = None,
    progress: bool = False,
    plot: Path | str | None = None,
    prefix: str = "replay/",
) -> ReplayReport:
    """Stream every trace under ``paths`` into the daemon and score it live.

    Args:
        client: a connected :class:`bwpredd.client.Client`.
        paths: trace files or directories, in any format
            :func:`bwpredd.traces.load_traces` reads.
        speedup: replay at this many times real time (sleeping each trace's
            step / speedup between samples); None: as fast as possible.
        progress: show a progress bar on stderr (tqdm, else a counter).
        plot: write forecast, interval and actual per trace to this PNG.
        prefix: the start of every replayed peer id.

    Returns:
        Per-file and pooled scores of the daemon, last value and EWMA.

    Raises:
        ReplayError: no trace was found, ``speedup`` is not positive, or
            ``plot`` is in a directory another user could write (or swap).
        FileNotFoundError: a path does not exist.
        grpc.RpcError: the daemon failed a call.
    """
    if speedup is not None and not (speedup > 0 and math.isfinite(speedup)):
        raise ReplayError(f"speedup: must be a positive number, got {speedup}")
    t0 = time.monotonic()
    traces, skipped = _load([Path(p) for p in paths])
    update, close = _progress(sum(len(tr) for tr in traces), progress)
    files: list[FileReport] = []
    pooled = {p: _Acc() for p in PREDICTORS}
    inside = scored = 0
    try:
        for trace in traces:
            report, accs, (hit, n) = _replay_one(
                client, trace, peer_id_for(trace.name, prefix), speedup, update
            )
            files.append(report)
            for p, a in accs.items():
                pooled[p].merge(a)
            inside += hit
            scored += n
    finally:
        close()
    result = ReplayReport(
        files=files,
        overall={p: a.scores() for p, a in pooled.items()},
        coverage=inside / scored if scored else math.nan,
        skipped=skipped,
        seconds=time.monotonic() - t0,
    )
    if plot is not None:
        _plot(result, Path(plot))
    return result


def _plot(report: ReplayReport, out: Path) -> None:
    """Forecast, interval, EWMA and actual per trace (the first 12)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ReplayError(f"--plot needs matplotlib ({exc}): pip install matplotlib") from exc
    files = report.files[:PLOT_MAX_FILES]
    fig, axes = plt.subplots(len(files), 1, figsize=(11, 2.6 * len(files)), squeeze=False)
    for ax, f in zip(axes[:, 0], files, strict=True):
        x = np.arange(1, len(f.actual) + 1)
        ax.fill_between(x, f.low, f.high, color="tab:blue", alpha=0.2, label="80% interval")
        ax.plot(x, f.actual, color="black", lw=1.2, label="actual")
        ax.plot(x, f.point, color="tab:blue", lw=1.2, label="daemon forecast")
        ax.plot(x, f.ewma, color="tab:orange", lw=1, ls="--", label="EWMA")
        s = f.scores["daemon"]
        ax.set_title(f"{_shorten(f.name, 70)}  (NMAE {s.nmae:.3f})", fontsize=9)
        ax.set_ylabel("Mbit/s")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    # Written by path (savefig): refuse a directory another user could plant
    # a link in, or swap a directory of, on the way (root may run this).
    try:
        os.close(open_trusted_dir(out.parent, whole_path=True))
    except OSError as exc:
        plt.close(fig)
        raise ReplayError(
            f"--plot {out}: {exc.filename}: {exc.strerror}; write the plot where no other "
            "user may write (nor in any directory above it)"
        ) from None
    fig.savefig(out, dpi=110)
    plt.close(fig)
