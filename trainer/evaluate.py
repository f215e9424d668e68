"""``python -m trainer eval``: score a forecaster against the baselines.

Loads any supported traces directory, cuts every trace into next-step
windows, and scores on the very same windows: the model (a checkpoint ``.pt``
through torch, or a model directory through onnxruntime, exactly as the
daemon runs it), last value, EWMA (alpha 0.3 and 0.5, and the better of the
two per source), the harmonic mean of the last 5 (floored at 1 kbit/s) and the
mean of the last 10, all from :mod:`bwpredd.baselines` so the daemon and this
report score the same thing. On synthetic traces it also scores the
generator's oracle (its conditional expectation): the noise floor. Results are
per source and macro-averaged over sources.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd import baselines
from bwpredd.traces import Trace
from trainer import metrics
from trainer.predict import BATCH, ForecastFn, forecast_fn

__all__ = [
    "BASELINES",
    "Predictor",
    "add_arguments",
    "best_baseline",
    "evaluate_traces",
    "evaluate_windows",
    "format_table",
    "load_predictor",
    "run",
    "selected_traces",
    "split_part",
]

F32 = npt.NDArray[np.float32]
Predictor = ForecastFn  # the model under evaluation
MODEL = "model"
ORACLE = "oracle"
BASELINES = ("last_value", "ewma", "ewma_0.3", "ewma_0.5", "harmonic_mean", "mean")
# What "best baseline" is chosen among: ewma is already the better alpha.
CANDIDATES = ("last_value", "ewma", "harmonic_mean", "mean")
# Sources whose name starts with this are generated, not measured: they get
# their own macro row so the headline (and issue 3's targets) is real traces.
SYNTHETIC_PREFIX = "synthetic"


def _baseline_points(x: F32) -> dict[str, F32]:
    return {
        "last_value": baselines.last_value(x),
        "ewma_0.3": baselines.ewma(x, alpha=0.3),
        "ewma_0.5": baselines.ewma(x, alpha=0.5),
        "harmonic_mean": baselines.harmonic_mean(x, last=5),
        "mean": baselines.mean(x, last=10),
    }


def _score_source(
    x: F32,
    y: F32,
    trace: npt.NDArray[np.integer],
    forecasts: dict[str, tuple[F32, F32, F32]],
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, (point, low, high) in forecasts.items():
        out[name] = metrics.score(y, trace, point, low, high)
    for name, point in _baseline_points(x).items():
        low, high = baselines.baseline_interval(x, point)
        out[name] = metrics.score(y, trace, point, low, high)
    best = min(("ewma_0.3", "ewma_0.5"), key=lambda k: out[k]["nmae"])
    out["ewma"] = {**out[best], "alpha": float(best.split("_")[1])}
    return out


def evaluate_windows(
    x: F32,
    y: F32,
    trace: npt.NDArray[np.integer],
    trace_source: Sequence[str],
    predict: Predictor | None,
    *,
    oracle: F32 | None = None,
) -> dict[str, Any]:
    """Score the model and every baseline on the same windows.

    Args:
        x: ``[N, WINDOW, WIDTH]`` raw windows.
        y: ``[N]`` next-step bandwidth.
        trace: ``[N]`` index into ``trace_source`` of each window.
        trace_source: the source name of each trace.
        predict: the model, or None to score the baselines alone.
        oracle: ``[N]`` the generator's conditional expectation (NaN where
            unknown, e.g. on real traces), or None.

    Returns:
        ``{"per_source": {source: {method: metrics}}, "macro": {method:
        metrics}, "best_baseline": {...}}``; ``macro`` averages the real
        sources (all sources when there are only synthetic ones); with both
        kinds present ``macro_synthetic`` and ``macro_all`` are added.
    """
    forecasts: dict[str, tuple[F32, F32, F32]] = {}
    if predict is not None:
        parts = [predict(x[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        forecasts[MODEL] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
        )
    src = np.array(trace_source)[trace]
    per_source: dict[str, dict[str, dict[str, float]]] = {}
    for source in sorted(set(src.tolist())):
        m = src == source
        sub = {k: (v[0][m], v[1][m], v[2][m]) for k, v in forecasts.items()}
        per_source[source] = _score_source(x[m], y[m], trace[m], sub)
        if oracle is not None and np.isfinite(oracle[m]).all():
            per_source[source][ORACLE] = metrics.score(y[m], trace[m], oracle[m])
    methods = [MODEL] if predict is not None else []
    methods += list(BASELINES)
    real = {s: r for s, r in per_source.items() if not s.startswith(SYNTHETIC_PREFIX)}
    synthetic = {s: r for s, r in per_source.items() if s.startswith(SYNTHETIC_PREFIX)}
    headline = real or synthetic

    def _macro(group: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
        names = methods + ([ORACLE] if all(ORACLE in r for r in group.values()) else [])
        return {name: metrics.macro({s: r[name] for s, r in group.items()}) for name in names}

    macro = _macro(headline)
    out: dict[str, Any] = {
        "per_source": per_source,
        "macro": macro,
        "macro_sources": sorted(headline),
        "best_baseline": best_baseline(per_source, macro),
    }
    if real and synthetic:
        out["macro_synthetic"] = _macro(synthetic)
        out["macro_all"] = _macro(per_source)
    return out


def best_baseline(
    per_source: dict[str, dict[str, dict[str, float]]], macro: dict[str, dict[str, float]]
) -> dict[str, Any]:
    """The best baseline by normalised MAE, macro and per source, and the
    model's ratio to each (below 1 means the model is better)."""
    macro_best = min(CANDIDATES, key=lambda k: macro[k]["nmae"])
    out: dict[str, Any] = {"macro": {"method": macro_best, "nmae": macro[macro_best]["nmae"]}}
    if MODEL in macro:
        out["macro"]["model_ratio"] = macro[MODEL]["nmae"] / macro[macro_best]["nmae"]
        out["macro"]["model_ratio_harmonic"] = macro[MODEL]["nmae"] / macro["harmonic_mean"]["nmae"]
    out["per_source"] = {}
    for source, res in per_source.items():
        best = min(CANDIDATES, key=lambda k: res[k]["nmae"])
        entry: dict[str, Any] = {"method": best, "nmae": res[best]["nmae"]}
        if MODEL in res:
            entry["model_ratio"] = res[MODEL]["nmae"] / res[best]["nmae"]
        out["per_source"][source] = entry
    return out


def evaluate_traces(
    traces: Sequence[Any], predict: Predictor | None, stride: int = 1
) -> dict[str, Any]:
    """Window ``traces`` (``trainer.data`` Trace objects) and score them.

    Traces that carry an ``oracle_next_bw`` array (synthetic ones) also get
    the oracle scored.
    """
    from trainer.data.windows import make_windows

    w = make_windows(list(traces), stride=stride)
    oracle = _oracle_for(traces, w.x, w.trace, stride)
    return evaluate_windows(w.x, w.y, w.trace, [t.source for t in traces], predict, oracle=oracle)


def _oracle_for(
    traces: Sequence[Any], x: F32, trace: npt.NDArray[np.integer], stride: int
) -> F32 | None:
    """The oracle forecast per window, NaN for traces without one."""
    have = [getattr(t, "oracle_next_bw", None) for t in traces]
    if all(h is None for h in have):
        return None
    out = np.full(len(x), np.nan, dtype=np.float32)
    for k, orc in enumerate(have):
        if orc is None:
            continue
        idx = np.flatnonzero(trace == k)
        # window j of trace k predicts row j*stride + WINDOW, and oracle[t]
        # is E[bw_t | the state after step t-1]: the same conditioning.
        targets = np.arange(len(idx)) * stride + x.shape[1]
        out[idx] = np.asarray(orc, dtype=np.float32)[targets]
    return out


def load_predictor(path: Path) -> tuple[Predictor, dict[str, Any]]:
    """A predictor from a checkpoint ``.pt`` (torch) or a model directory
    (``manifest.json`` + ONNX, through onnxruntime).

    Returns:
        ``(predict, info)`` where info says what was loaded.
    """
    if path.is_dir():
        return _onnx_predictor(path)
    import torch

    from trainer.models.forecaster import load_checkpoint

    torch.set_num_threads(2)
    model, ckpt = load_checkpoint(str(path))
    info = {"kind": "checkpoint", "path": str(path), "seed": ckpt.get("seed")}
    return forecast_fn(model), info


def _onnx_predictor(model_dir: Path) -> tuple[Predictor, dict[str, Any]]:
    from bwpredd.modeldir import load_model

    model = load_model(model_dir, threads=2)

    def predict(x: F32) -> tuple[F32, F32, F32]:
        return model.run_forecaster(np.ascontiguousarray(x, np.float32))

    return predict, {"kind": "onnx", "path": str(model_dir), "version": model.version}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: normalised MAE per source and method, coverage,
    and the macro row."""
    per_source = result["per_source"]
    methods = [m for m in (MODEL, *BASELINES, ORACLE) if any(m in r for r in per_source.values())]
    head = f"{'source':<24}" + "".join(f"{m:>14}" for m in methods) + f"{'cov80':>8}"
    lines = ["normalised MAE (MAE / trace mean, averaged over traces); lower is better", head]
    rows = [*sorted(per_source.items()), ("MACRO", result["macro"])]
    if "macro_synthetic" in result:
        rows.append(("MACRO synthetic", result["macro_synthetic"]))
    for source, res in rows:
        cells = "".join(f"{res[m]['nmae']:>14.4f}" if m in res else f"{'-':>14}" for m in methods)
        cov = res.get(MODEL, res.get("last_value", {})).get("coverage", float("nan"))
        lines.append(f"{source:<24}{cells}{cov:>8.3f}")
    best = result["best_baseline"]["macro"]
    if "model_ratio" in best:
        lines.append(
            f"model / best baseline ({best['method']}): {best['model_ratio']:.3f}; "
            f"model / harmonic mean: {best['model_ratio_harmonic']:.3f}"
        )
    return "\n".join(lines)


def _split_record(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "split.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (train a run first)")
    raw: dict[str, Any] = json.loads(path.read_text())
    return raw


def split_part(traces: Sequence[Trace], record: dict[str, Any], split: str) -> list[Trace]:
    """The traces (or pieces of them) that a run's ``split.json`` put in
    ``split``: by name, and for timed traces (recordings) by the run's time
    cuts, so data recorded since the run is test, never train.

    Args:
        traces: the traces loaded again.
        record: the run's ``split.json``.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """
    from trainer.data.windows import SPLIT_NAMES, split_by_time

    keep = {f"{r['source']}/{r['name']}" for r in record["splits"][split]}
    cuts = {g: (float(a), float(b)) for g, (a, b) in record.get("time_cuts", {}).items()}
    which = SPLIT_NAMES.index(split)
    out: list[Trace] = []
    for t in traces:
        if t.start_s is None:
            if f"{t.source}/{t.name}" in keep:
                out.append(t)
            continue
        piece = split_by_time(t, cuts.get(t.group, (-np.inf, -np.inf)))[which]
        if piece is not None:
            out.append(piece)
    return out


def selected_traces(args: argparse.Namespace) -> tuple[list[Trace], str]:
    """The traces an evaluation command scores: those of ``--traces``, only
    the ``--split`` part of ``--split-from``'s split.json when it is given
    (:func:`split_part`) or of ``make train``'s split for ``--split-seed``
    (:func:`trainer.train_agent.training_split`: the real traces and the
    synthetic profiles), and a description of the choice. Files of no known
    format are named on stderr."""
    from bwpredd.traces import load_traces

    if getattr(args, "split_seed", None) is not None:
        from trainer.train_agent import training_split

        train, val, test = training_split(
            Path(args.traces), args.split_seed, progress=not args.quiet
        )
        parts = {"train": train, "val": val, "test": test}
        split = f"the '{args.split}' split of make train's split for seed {args.split_seed}"
        print(f"{len(parts[args.split])} traces of {split}")
        return parts[args.split], split
    loaded = load_traces(Path(args.traces), progress=not args.quiet)
    traces = list(loaded.traces)
    for item in loaded.unknown:
        print(f"unknown file (not evaluated): {item}", file=sys.stderr)
    split = "all traces given"
    if args.split_from:
        traces = split_part(traces, _split_record(Path(args.split_from)), args.split)
        split = f"the '{args.split}' split of {args.split_from}"
        print(f"{len(traces)} traces of {split}")
    return traces, split


def run(args: argparse.Namespace) -> int:
    """The ``eval`` command."""
    traces, _ = selected_traces(args)
    if not traces:
        print("no usable traces", file=sys.stderr)
        return 2
    predict, info = load_predictor(Path(args.model))
    result = evaluate_traces(traces, predict)
    result["model"] = info
    result["traces_dir"] = str(args.traces)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`selected_traces` reads: ``--split-from`` or
    ``--split-seed``, and ``--split``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--split-from", help="a run directory: evaluate only the files of its split.json"
    )
    which.add_argument(
        "--split-seed",
        type=int,
        help="evaluate only the files of make train's split for this seed (with the "
        "synthetic profiles), as trainer report-allocator rebuilds it",
    )
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m trainer eval``."""
    parser.add_argument("--traces", required=True, help="a supported traces directory")
    parser.add_argument("--model", required=True, help="checkpoint .pt or model directory")
    parser.add_argument("--json", help="write the full results here")
    add_selection_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
