"""``python -m trainer eval-transfer``: how long transfers really took, against
what the model and the constant-rate baselines said.

The protocol (issue 16). At sampled points of each trace (up to
:data:`MAX_POINTS` per trace, evenly spaced; the window is the 10 samples up
to the point, its step the median gap of their times, as the daemon reads
it), a payload sized to take ``d`` seconds at the window's last value, for
``d`` in :data:`DURATIONS`. The actual time comes from integrating the trace
from the point on: sample ``j`` at time ``t_j`` delivered its rate over
``(t_{j-1}, t_j]`` (a throughput sample reports the interval it closes).
A point is used for ``d`` only when the trace goes on for at least
:data:`MIN_REMAINING` x ``d`` seconds after it (a position rule, blind to
the outcome: otherwise short traces, such as Pantheon's 30 s runs, would
only keep the transfers that happened to speed up); points whose last value
is below 1 kbit/s (no payload to size) and transfers that still do not
finish before the trace ends (``censored``, counted in the results) are left
out, for every method alike.

Methods: ``model`` (:meth:`bwpredd.Predictor.transfer_time`: the horizon
graph when the model directory declares horizons), ``today`` (payload over
the next-step forecast, the interval's ends giving the time's: what Advise
did before horizons), and constant rates from the window: ``last_value``,
``ewma`` (alpha 0.5) and ``mean`` (of the 10), each with the interval
:func:`bwpredd.baselines.baseline_interval` puts around it (the window's
step-to-step log spread, as the daemon's cold-start answers).

Scores per trace, then averaged over a source's traces, then over sources
(``macro``: the real sources; synthetic profiles apart): ``err`` the median
over the trace's points of ``|ln(seconds / actual)|``; ``coverage`` the share
of points with ``low_seconds <= actual <= high_seconds``; ``width`` the mean
of ``(high_seconds - low_seconds) / seconds``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd import baselines
from bwpredd.schema import BW, WIDTH, WINDOW
from bwpredd.transfer import MIN_BW_MBPS, next_step_seconds

__all__ = [
    "CONSTANT",
    "DURATIONS",
    "METHODS",
    "Points",
    "actual_seconds",
    "add_arguments",
    "cumulative",
    "evaluate_points",
    "format_table",
    "mean_over",
    "render_markdown",
    "sample_points",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
DURATIONS: tuple[float, ...] = (5.0, 20.0, 60.0)
MAX_POINTS = 100
MIN_REMAINING = 2.0
CONSTANT = ("last_value", "ewma", "mean")
METHODS = ("model", "today", *CONSTANT)
SYNTHETIC_PREFIX = "synthetic"
_BW = BW
# (windows [n, WINDOW, WIDTH], step_s [n], payload_bytes [n]) -> (seconds, low, high) [n]
TimeFn = Callable[[F32, F64, F64], tuple[F64, F64, F64]]


def cumulative(trace: Any) -> tuple[F64, F64]:
    """``(edges, mbit)``: the trace's sample times and the Mbit delivered by
    each (sample ``j`` at its rate over ``(t_{j-1}, t_j]``; the first over one
    step before it)."""
    bw = np.maximum(trace.data[:, _BW].astype(np.float64), 0.0)
    if trace.time_s is not None:
        t = np.asarray(trace.time_s, dtype=np.float64)
    else:
        t = np.arange(len(bw), dtype=np.float64) * trace.step_s
    dt = np.diff(t, prepend=t[0] - trace.step_s)
    dt = np.maximum(dt, 0.0)
    return t, np.cumsum(bw * dt)


def actual_seconds(edges: F64, mbit: F64, k: npt.NDArray[np.integer], bits: F64) -> F64:
    """Seconds from ``edges[k]`` until ``bits`` more Mbit were delivered;
    NaN where the trace ends first."""
    target = mbit[k] + bits
    j = np.searchsorted(mbit, target, side="left")  # first edge reaching it
    ok = (j < len(mbit)) & (bits > 0)
    j = np.minimum(j, len(mbit) - 1)
    prev = np.maximum(j - 1, 0)
    seg = mbit[j] - mbit[prev]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(seg > 0, (target - mbit[prev]) / seg, 1.0)
    t = edges[prev] + np.clip(frac, 0.0, 1.0) * (edges[j] - edges[prev])
    out: F64 = np.where(ok, t - edges[k], np.nan)
    return out


def mean_over(edges: F64, mbit: F64, k: npt.NDArray[np.integer], horizons: F64) -> F64:
    """Mean Mbit/s over the next ``horizons`` seconds from ``edges[k]``:
    ``[len(k), H]``, NaN where the trace ends first."""
    start = edges[k][:, None]
    end = start + horizons[None, :]
    got = np.interp(end, edges, mbit) - mbit[k][:, None]
    out: F64 = np.where(end <= edges[-1] + 1e-9, got / horizons[None, :], np.nan)
    return out


def window_steps(times: F64) -> F64:
    """Median gap ``[n]`` of windows' sample times ``[n, W]`` (the daemon's
    :func:`bwpredd.state.step_seconds` on full windows)."""
    out: F64 = np.median(np.diff(times, axis=1), axis=1)
    return np.where(out > 0, out, 1.0)


@dataclass
class Points:
    """Evaluation points of many traces, one row per (point, duration)."""

    windows: F32  # [n, WINDOW, WIDTH]
    step_s: F64  # [n]
    payload_bytes: F64  # [n]
    actual: F64  # [n] seconds
    duration: F64  # [n] the d the payload was sized for
    trace: npt.NDArray[np.int64]  # [n] index into sources
    sources: list[str]  # per trace
    censored: dict[str, int] = field(default_factory=dict)  # per d: unfinished transfers


def sample_points(
    traces: Sequence[Any], durations: Sequence[float] = DURATIONS, max_points: int = MAX_POINTS
) -> Points:
    """The evaluation points of ``traces`` (``trainer.data`` Trace objects)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("w", "s", "p", "a", "d", "i")}
    censored = {f"{d:g}": 0 for d in durations}
    for i, tr in enumerate(traces):
        n = len(tr)
        if n < WINDOW + 1:
            continue
        edges, mbit = cumulative(tr)
        ks = np.unique(np.linspace(WINDOW - 1, n - 2, min(max_points, n - WINDOW)).astype(np.int64))
        idx = ks[:, None] + np.arange(-WINDOW + 1, 1)[None, :]
        windows = tr.data[idx].astype(np.float32)
        steps = window_steps(edges[idx])
        last = windows[:, -1, _BW].astype(np.float64)
        for d in durations:
            bits = d * last
            act = actual_seconds(edges, mbit, ks, bits)
            usable = (last >= MIN_BW_MBPS) & (edges[-1] - edges[ks] >= MIN_REMAINING * d)
            keep = usable & np.isfinite(act) & (act > 0)
            censored[f"{d:g}"] += int((usable & ~np.isfinite(act)).sum())
            cols["w"].append(windows[keep])
            cols["s"].append(steps[keep])
            cols["p"].append(bits[keep] * 1e6 / 8.0)
            cols["a"].append(act[keep])
            cols["d"].append(np.full(int(keep.sum()), d))
            cols["i"].append(np.full(int(keep.sum()), i, dtype=np.int64))
    if not cols["w"]:
        empty = np.zeros(0)
        return Points(
            np.zeros((0, WINDOW, WIDTH), np.float32),
            empty,
            empty,
            empty,
            empty,
            np.zeros(0, np.int64),
            [t.source for t in traces],
            censored,
        )
    return Points(
        np.concatenate(cols["w"]),
        np.concatenate(cols["s"]),
        np.concatenate(cols["p"]),
        np.concatenate(cols["a"]),
        np.concatenate(cols["d"]),
        np.concatenate(cols["i"]),
        [t.source for t in traces],
        censored,
    )


def constant_times(windows: F32, payload_bytes: F64) -> dict[str, tuple[F64, F64, F64]]:
    """The constant-rate baselines' times and intervals."""
    bits = payload_bytes * 8.0 / 1e6
    out = {}
    for name, point in (
        ("last_value", baselines.last_value(windows)),
        ("ewma", baselines.ewma(windows, alpha=0.5)),
        ("mean", baselines.mean(windows)),
    ):
        low, high = baselines.baseline_interval(windows, point)
        out[name] = next_step_seconds(point, low, high, bits)
    return out


def _score(
    pts: Points, sel: npt.NDArray[np.bool_], t: F64, lo: F64, hi: F64
) -> dict[str, dict[str, float]]:
    """Per source: mean over its traces of each trace's scores."""
    err = np.abs(np.log(np.maximum(t, 1e-12) / pts.actual))
    cov = (lo <= pts.actual * (1 + 1e-9)) & (pts.actual <= hi * (1 + 1e-9))
    width = (hi - lo) / np.maximum(t, 1e-12)
    per_source: dict[str, list[tuple[float, float, float, int]]] = {}
    for i in np.unique(pts.trace[sel]).tolist():
        m = sel & (pts.trace == i)
        per_source.setdefault(pts.sources[i], []).append(
            (
                float(np.median(err[m])),
                float(cov[m].mean()),
                float(width[m].mean()),
                int(m.sum()),
            )
        )
    return {
        src: {
            "err": float(np.mean([r[0] for r in rows])),
            "coverage": float(np.mean([r[1] for r in rows])),
            "width": float(np.mean([r[2] for r in rows])),
            "traces": len(rows),
            "points": int(sum(r[3] for r in rows)),
        }
        for src, rows in sorted(per_source.items())
    }


def evaluate_points(pts: Points, methods: dict[str, TimeFn | None]) -> dict[str, Any]:
    """Score every method at every duration.

    Args:
        pts: from :func:`sample_points`.
        methods: name -> time function; the constant baselines are added.

    Returns:
        ``{"durations": {"5": {"per_source": {src: {method: scores}},
        "macro": {method: scores}, "macro_synthetic": ..., "best_constant":
        {...}}}}``.
    """
    times: dict[str, tuple[F64, F64, F64]] = {}
    for name, fn in methods.items():
        if fn is not None and len(pts.actual):
            times[name] = fn(pts.windows, pts.step_s, pts.payload_bytes)
    if len(pts.actual):
        times.update(constant_times(pts.windows, pts.payload_bytes))
    out: dict[str, Any] = {"durations": {}}
    for d in sorted(set(pts.duration.tolist())):
        sel = pts.duration == d
        per_source: dict[str, dict[str, Any]] = {}
        for name, (t, lo, hi) in times.items():
            for src, sc in _score(pts, sel, t, lo, hi).items():
                per_source.setdefault(src, {})[name] = sc
        entry: dict[str, Any] = {
            "per_source": per_source,
            "points": int(sel.sum()),
            "censored": pts.censored.get(f"{d:g}", 0),
        }
        for key, pick in (
            ("macro", lambda s: not s.startswith(SYNTHETIC_PREFIX)),
            ("macro_synthetic", lambda s: s.startswith(SYNTHETIC_PREFIX)),
        ):
            chosen = [r for s, r in per_source.items() if pick(s)]
            if not chosen:
                continue
            entry[key] = {
                name: {
                    metric: float(np.mean([r[name][metric] for r in chosen]))
                    for metric in ("err", "coverage", "width")
                }
                | {"sources": len(chosen)}
                for name in times
            }
        if "macro" in entry:
            macro = entry["macro"]
            best = min((m for m in CONSTANT if m in macro), key=lambda m: macro[m]["err"])
            entry["best_constant"] = {"method": best, "err": macro[best]["err"]}
            for name in ("model", "today"):
                if name in macro:  # None when the constant rate is exact (a flat link)
                    base = macro[best]["err"]
                    ratio = macro[name]["err"] / base if base > 0 else None
                    entry["best_constant"][f"{name}_ratio"] = ratio
        out["durations"][f"{d:g}"] = entry
    return out


def format_table(result: dict[str, Any]) -> str:
    """The macro table: per d, error of today / best constant / model and
    the model's ratio, and each one's coverage."""
    lines = [
        "median |ln(predicted / actual time)|, macro over real sources; "
        "coverage of the 80% interval",
        f"{'d (s)':>6} {'today':>8} {'best constant':>22} {'model':>8} {'ratio':>6}"
        f" {'cov today':>10} {'cov const':>10} {'cov model':>10} {'width model':>12}",
    ]
    for d, entry in result["durations"].items():
        if "macro" not in entry:
            continue
        m, best = entry["macro"], entry["best_constant"]
        name = best["method"]

        def g(meth: str, key: str, mm: dict[str, Any] = m) -> float:
            return float(mm[meth][key]) if meth in mm else float("nan")

        lines.append(
            f"{d:>6} {g('today', 'err'):>8.3f} {best['err']:>13.3f} ({name:<7}) "
            f"{g('model', 'err'):>8.3f} {_num(best.get('model_ratio')):>6.3f}"
            f" {g('today', 'coverage'):>10.3f} {g(name, 'coverage'):>10.3f}"
            f" {g('model', 'coverage'):>10.3f} {g('model', 'width'):>12.3f}"
        )
    return "\n".join(lines)


def _num(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def render_markdown(result: dict[str, Any], plot: str | None, command: str) -> str:
    """``reports/transfer.md``: the macro table, per-source tables, the plot."""
    out = [
        "# Transfer time: horizon model against today's rule and constant rates",
        "",
        f"Written by `{command}` (`trainer/eval_transfer.py` has the protocol). "
        f"Split: {result.get('split', 'all traces given')}; model "
        f"`{result.get('model', {}).get('version', '-')}`"
        f" (horizons: {result.get('model', {}).get('horizons') or 'none: today’s rule'}).",
        "",
        "Payloads sized to take d seconds at the window's last value; the actual time "
        "integrates the trace from that point. Error: median over a trace's points of "
        "|ln(predicted / actual)|, averaged over the source's traces, then over the real "
        "sources. Coverage: share of actual times inside the nominal 80% interval. "
        "Width: mean (high - low) / predicted.",
        "",
        "A point counts for d only when its trace goes on for 2 d seconds after it, so "
        "short sources (Pantheon's 30 s runs, 5Gophers' 60 s series) drop out at long d; "
        "`sources` says how many the macro averages.",
        "",
        "| d (s) | sources | today's rule | best constant rate | model | model / best constant "
        "| coverage: today / best constant / model | width: model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d, entry in result["durations"].items():
        if "macro" not in entry:
            continue
        m, best = entry["macro"], entry["best_constant"]
        name = best["method"]
        out.append(
            f"| {d} | {m['model']['sources']} | {m['today']['err']:.3f} "
            f"| {best['err']:.3f} ({name}) "
            f"| {m['model']['err']:.3f} | {_num(best.get('model_ratio')):.3f} "
            f"| {m['today']['coverage']:.2f} / {m[name]['coverage']:.2f} / "
            f"{m['model']['coverage']:.2f} | {m['model']['width']:.2f} |"
        )
    for d, entry in result["durations"].items():
        out += [
            "",
            f"## d = {d} s, per source",
            "",
            "| source | traces | points | model err | today | last value | EWMA 0.5 | mean "
            "| model / best constant | coverage model | coverage today |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for src, r in entry["per_source"].items():
            best = min(r[m]["err"] for m in CONSTANT)
            out.append(
                f"| {src} | {r['model']['traces']} | {r['model']['points']} "
                f"| {r['model']['err']:.3f} | {r['today']['err']:.3f} "
                f"| {r['last_value']['err']:.3f} | {r['ewma']['err']:.3f} | {r['mean']['err']:.3f} "
                f"| {_num(r['model']['err'] / best if best > 0 else None):.3f} "
                f"| {r['model']['coverage']:.2f} "
                f"| {r['today']['coverage']:.2f} |"
            )
    if plot:
        out += ["", f"![predicted against actual times]({plot})", ""]
    return "\n".join(out) + "\n"


def plot_times(pts: Points, times: tuple[F64, F64, F64], path: Path, per_d: int = 150) -> None:
    """Predicted against actual times (log-log), with the 80% intervals, per d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    durations = sorted(set(pts.duration.tolist()))
    fig, axes = plt.subplots(1, len(durations), figsize=(5 * len(durations), 4.6), squeeze=False)
    rng = np.random.default_rng(0)
    real = np.array([not s.startswith(SYNTHETIC_PREFIX) for s in pts.sources])[pts.trace]
    for ax, d in zip(axes[0], durations, strict=True):
        idx = np.flatnonzero((pts.duration == d) & real)
        idx = rng.choice(idx, size=min(per_d, len(idx)), replace=False) if len(idx) else idx
        t, lo, hi = (x[idx] for x in times)
        a = pts.actual[idx]
        inside = (lo <= a) & (a <= hi)
        for mask, color, label in ((inside, "tab:blue", "inside"), (~inside, "tab:red", "outside")):
            ax.errorbar(
                a[mask],
                t[mask],
                yerr=[t[mask] - lo[mask], hi[mask] - t[mask]],
                fmt="o",
                ms=3,
                color=color,
                alpha=0.5,
                elinewidth=0.7,
                label=f"actual {label} the interval",
            )
        span = (
            [max(min(a.min(), lo.min()) * 0.8, 1e-2), max(a.max(), hi.max()) * 1.2]
            if len(a)
            else [1, 10]
        )
        ax.plot(span, span, "k--", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("actual time (s)")
        ax.set_ylabel("predicted time (s), 80% interval")
        ax.set_title(f"payload = {d:g} s at the last value (test, real sources)")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def predictor_methods(model_dir: Path) -> tuple[dict[str, TimeFn | None], dict[str, Any]]:
    """``model`` and ``today`` time functions of a model directory, through
    :class:`bwpredd.Predictor` (onnxruntime)."""
    from bwpredd.predictor import Predictor

    p = Predictor.load(model_dir, threads=2)

    def model(w: F32, step: F64, payload: F64) -> tuple[F64, F64, F64]:
        tt = p.transfer_time(w, payload, step_s=step)
        return tt.seconds, tt.low_seconds, tt.high_seconds

    def today(w: F32, step: F64, payload: F64) -> tuple[F64, F64, F64]:
        fc = p.forecast(w)
        return next_step_seconds(fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps, payload * 8 / 1e6)

    model_dir_horizons = list(p.engine.model.manifest.horizons) if p.engine.model else []
    return {"model": model, "today": today}, {
        "path": str(model_dir),
        "version": p.model_version,
        "horizons": model_dir_horizons,
    }


def run_eval(
    traces: Sequence[Any], model_dir: Path, split: str = "all traces given"
) -> tuple[dict[str, Any], Points, dict[str, TimeFn | None]]:
    """Evaluate a model directory on traces; returns the result, the points
    and the methods (for the plot)."""
    methods, info = predictor_methods(model_dir)
    pts = sample_points(traces)
    result = evaluate_points(pts, methods)
    result["model"] = info
    result["split"] = split
    result["protocol"] = {"durations": list(DURATIONS), "max_points_per_trace": MAX_POINTS}
    return result, pts, methods


def write_reports(
    result: dict[str, Any],
    pts: Points,
    model_fn: TimeFn | None,
    reports: Path,
    command: str,
) -> None:
    """``transfer.md``, ``transfer.json`` and ``transfer_times.png`` in ``reports``."""
    reports.mkdir(parents=True, exist_ok=True)
    plot = None
    if model_fn is not None and len(pts.actual):
        plot = "transfer_times.png"
        plot_times(pts, model_fn(pts.windows, pts.step_s, pts.payload_bytes), reports / plot)
    (reports / "transfer.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (reports / "transfer.md").write_text(render_markdown(result, plot, command))


def run(args: argparse.Namespace) -> int:
    """The ``eval-transfer`` command."""
    from trainer.evaluate import selected_traces

    traces, split = selected_traces(args)
    if not traces:
        print("no usable traces", file=sys.stderr)
        return 2
    result, pts, methods = run_eval(traces, Path(args.model), split)
    result["traces_dir"] = str(args.traces)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    if args.reports:
        write_reports(
            result, pts, methods["model"], Path(args.reports), "python -m trainer eval-transfer"
        )
        print(f"wrote {args.reports}/transfer.md")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m trainer eval-transfer``."""
    from trainer.evaluate import add_selection_arguments

    parser.add_argument("--traces", required=True, help="a supported traces directory")
    parser.add_argument("--model", required=True, help="a model directory")
    parser.add_argument("--json", help="write the full results here")
    add_selection_arguments(parser)
    parser.add_argument("--reports", help="also write transfer.md, .json and the plot here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
