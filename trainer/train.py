"""``python -m trainer train``: data -> forecaster -> evaluation -> reports.

Then the horizon model for transfer times (:mod:`trainer.train_transfer`,
``transfer.md``) and the allocator, on the same split.

Loads the real traces and the synthetic profiles, splits them by fold group
(``split.json`` records the files of each split so ``trainer eval
--split-from`` and export reuse the same test files), trains the forecaster,
scores it against every baseline on the validation and test splits, hands the
splits to the allocator's trainer when it exists, and writes
``training_report.json``, ``forecaster.md`` and the plots.

Under ``torchrun`` every rank loads the traces and makes the same split; the
forecaster trains data-parallel over the ranks (:mod:`trainer.distributed`),
then the process group closes and rank 0 alone calibrates, evaluates, trains
the horizon model and the agent, and writes; the other ranks exit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from trainer import distributed
from trainer.evaluate import evaluate_traces, format_table
from trainer.members import train_members
from trainer.models.forecaster import (
    Forecaster,
    ForecasterConfig,
    load_checkpoint,
    save_checkpoint,
)
from trainer.predict import forecast_fn
from trainer.train_forecaster import TrainConfig, calibrate_interval, train_forecaster

__all__ = ["add_arguments", "main", "run"]

SPLIT_FRACTIONS = (0.7, 0.15, 0.15)
# Synthetic data: 2 profiles x N_SYNTHETIC / 2 traces of SYNTHETIC_LENGTH steps
# (60 x 500 = 30,000 samples, three times the origin's 10,000).
N_SYNTHETIC = 60
SYNTHETIC_LENGTH = 500


def _json_safe(obj: Any) -> Any:
    """Plain Python types only (checkpoints load with ``weights_only=True``)."""
    return json.loads(json.dumps(obj, default=float))


def _split_record(parts: dict[str, list[Any]], seed: int, traces_dir: str) -> dict[str, Any]:
    return {
        "seed": seed,
        "traces_dir": traces_dir,
        "fractions": list(SPLIT_FRACTIONS),
        "synthetic": {"n_traces": N_SYNTHETIC, "length": SYNTHETIC_LENGTH, "seed": seed},
        "splits": {
            name: [{"source": t.source, "name": t.name, "group": t.group} for t in traces]
            for name, traces in parts.items()
        },
    }


def quick_config(seed: int) -> TrainConfig:
    """A tiny run: seconds, for tests and a first embedded model."""
    return TrainConfig(
        seed=seed,
        max_epochs=2,
        steps_per_epoch=15,
        val_windows_per_trace=8,
        patience=2,
    )


def _train_agent(
    parts: dict[str, list[Any]],
    forecaster_path: Path,
    out: Path,
    reports: Path,
    args: argparse.Namespace,
) -> tuple[dict[str, Any] | None, str]:
    try:
        from trainer.dqn import QUICK, AgentConfig
        from trainer.train_agent import train_agent
    except ImportError as exc:
        print(f"allocator agent skipped: trainer.train_agent not importable ({exc})")
        return None, f"skipped: {exc}"
    overrides = {
        k: v
        for k, v in (
            ("gamma", args.agent_gamma),
            ("episodes", args.agent_episodes),
            ("members", args.members),
        )
        if v is not None
    }
    base = QUICK if args.quick else AgentConfig()
    config = replace(base, **overrides) if overrides else None
    metrics = train_agent(
        train_traces=parts["train"],
        val_traces=parts["val"],
        test_traces=parts["test"],
        forecaster_path=forecaster_path,
        out_dir=out,
        seed=args.seed,
        quick=args.quick,
        reports_dir=reports,
        config=config,
        progress=not args.quiet,
    )
    return _json_safe(metrics), "trained"


def _train_transfer(
    parts: dict[str, list[Any]],
    predict: Any,
    out: Path,
    reports: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The horizon (transfer-time) model on the same split; its report,
    with today's rule from this run's forecaster beside it."""
    from trainer.train_transfer import (
        TransferTrainConfig,
        compact,
        report_transfer,
        today_times,
        train_transfer,
    )

    cfg = TransferTrainConfig(seed=args.seed)
    if args.quick:
        cfg.steps, cfg.eval_every, cfg.points_per_trace = 60, 30, 40
    model, summary = train_transfer(
        parts["train"], parts["val"], parts["test"], out, cfg=cfg, progress=not args.quiet
    )
    result = report_transfer(
        model,
        parts["test"],
        today_times(predict),
        reports,
        command="make train",
        split="the 'test' split",
    )
    print(f"wrote {reports}/transfer.md")
    summary_json: dict[str, Any] = _json_safe(
        {
            "test": compact(result),
            "calibration": summary["calibration"],
            "train_seconds": summary["train_seconds"],
        }
    )
    return summary_json


def run(args: argparse.Namespace) -> int:
    """The ``train`` command: one process, or every rank under torchrun."""
    distributed.setup()
    try:
        return _run(args)
    finally:
        distributed.shutdown(wait=False)  # an error path; the normal one closed it


def _run(args: argparse.Namespace) -> int:
    from bwpredd.traces import load_traces, summarize
    from trainer.data.synthetic import synthetic_traces
    from trainer.data.windows import split_summary, split_traces, time_cuts

    if args.members is not None and args.members < 1:
        print(f"--members: must be >= 1, got {args.members}", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    main = distributed.is_main()
    out = Path(args.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    reports = (
        Path(args.reports) if args.reports else (out / "reports" if args.quick else Path("reports"))
    )
    loaded = load_traces(Path(args.traces), progress=main and not args.quiet)
    for item in loaded.unknown if main else ():
        print(f"unknown file (not used): {item}", file=sys.stderr)
    real = list(loaded.traces)
    n_syn, length = (6, 100) if args.quick else (N_SYNTHETIC, SYNTHETIC_LENGTH)
    synthetic = synthetic_traces(args.seed, n_traces=n_syn, length=length)
    cuts = time_cuts(real, SPLIT_FRACTIONS)  # recordings are split by time
    train, val, test = split_traces(real + synthetic, SPLIT_FRACTIONS, seed=args.seed, cuts=cuts)
    parts = {"train": train, "val": val, "test": test}
    split_rec = _split_record(parts, args.seed, str(args.traces))
    split_rec["synthetic"].update(n_traces=n_syn, length=length)
    split_rec["time_cuts"] = {g: list(c) for g, c in cuts.items()}
    if main:
        print(
            f"{len(real)} real + {len(synthetic)} synthetic traces -> "
            f"{len(train)} train / {len(val)} val / {len(test)} test"
        )
        (out / "split.json").write_text(json.dumps(split_rec, indent=1) + "\n")

    cfg = quick_config(args.seed) if args.quick else TrainConfig(seed=args.seed)
    # The two synthetic profiles together weigh as much as one real source:
    # they are one generator, and the model ships for real links.
    cfg.source_weights = {t.source: 0.5 for t in synthetic}
    if args.max_epochs:
        cfg.max_epochs = args.max_epochs
    if args.threads:
        cfg.threads = args.threads
    if args.time_budget:
        cfg.time_budget_s = args.time_budget
    if args.ema_decay is not None:
        cfg.ema_decay = args.ema_decay
    ckpt = out / "forecaster.pt"
    if args.skip_training:
        # Everything after training, again: same split, the run's weights.
        model, meta = load_checkpoint(str(ckpt))
        model_cfg = model.cfg
        cfg = TrainConfig(**meta["train_config"])  # type: ignore[arg-type]
        history = meta["history"]
        assert isinstance(history, dict)
        print(f"forecaster: loaded {ckpt} (--skip-training)")
    else:
        model_cfg = ForecasterConfig(residual=True)
        n = args.members or 1
        jobs = [
            {
                "train_traces": train,
                "val_traces": val,
                "cfg": replace(cfg, seed=cfg.seed + i),
                "model_cfg": model_cfg,
                "progress": not args.quiet,
            }
            for i in range(n)
        ]
        model, hists = train_members(train_forecaster, jobs, Forecaster.merge)
        for i, hist in enumerate(hists if main else ()):
            print(
                f"forecaster {i} (seed {cfg.seed + i}): {hist.stopped}; "
                f"best epoch {hist.best_epoch}, {hist.seconds:.0f} s"
            )
        # The first member's curves, and every member's summary.
        history = _json_safe(hists[0].to_json())
        history["members"] = [_json_safe(h.to_json()) for h in hists]
    dist_info = distributed.finish(model, "training_report.json")
    if not main:
        return 0
    if val:
        scale = calibrate_interval(model, val)
        print(f"interval scale calibrated on the validation split: {scale:.3f}")

    predict = forecast_fn(model)
    val_res = evaluate_traces(val, predict) if val else None
    test_res = evaluate_traces(test, predict)
    print(format_table(test_res))

    summary = split_summary(train, val, test)
    training_data = _json_safe(
        {
            "traces_dir": str(args.traces),
            "real": summarize(loaded),
            "synthetic": {"n_traces": n_syn, "length": length, "seed": args.seed},
            "unknown_files": [str(p) for p in loaded.unknown],
        }
    )
    save_checkpoint(
        model,
        str(ckpt),
        seed=args.seed,
        metrics=_json_safe(
            {"test": {"macro": test_res["macro"], "best_baseline": test_res["best_baseline"]}}
        ),
        training_data=_json_safe({"split": summary, **training_data}),
        train_config=_json_safe(asdict(cfg)),
        history=history,
    )
    print(f"wrote {ckpt}")

    from trainer.plots import pick_traces, plot_forecasts, plot_learning_curve, plot_ratios
    from trainer.report import build_report, render_markdown

    report = build_report(
        test=test_res,
        val=val_res,
        history=history,
        train_config=_json_safe(asdict(cfg)),
        model_config=_json_safe(asdict(model_cfg)),
        split=summary,
        training_data=training_data,
        seed=args.seed,
        agent_status="skipped: --skip-agent" if args.skip_agent else "pending",
    )
    report["training"]["forecaster_total_seconds"] = time.monotonic() - t_start
    report["quick"] = bool(args.quick)
    report["distributed"] = dist_info
    reports.mkdir(parents=True, exist_ok=True)
    plots = ["forecaster_ratios.png", "forecaster_test_traces.png", "learning_curve.png"]
    plot_ratios(test_res, reports / plots[0])
    plot_forecasts(pick_traces(test, n=4), predict, reports / plots[1])
    plot_learning_curve(history, reports / plots[2])

    def write_reports() -> None:
        (reports / "training_report.json").write_text(
            json.dumps(_json_safe(report), indent=2, sort_keys=True) + "\n"
        )
        (reports / "forecaster.md").write_text(render_markdown(report, plots))

    # Written before the agent trains, so its failure cannot lose them.
    write_reports()
    print(f"wrote {reports}/training_report.json, forecaster.md, {', '.join(plots)}")
    if not args.skip_transfer:
        report["transfer"] = _train_transfer(parts, predict, out, reports, args)
        write_reports()
    if not args.skip_agent:
        ddqn_metrics, report["agent_status"] = _train_agent(parts, ckpt, out, reports, args)
        if ddqn_metrics is not None:
            report["ddqn_metrics"] = ddqn_metrics
        write_reports()
        print(f"updated {reports}/training_report.json (agent: {report['agent_status']})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m trainer train``."""
    parser.add_argument("--traces", required=True, help="a supported traces directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/latest", help="run directory")
    parser.add_argument(
        "--reports",
        help="where reports go (default: reports/, or <out>/reports with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny run of a few seconds")
    parser.add_argument("--skip-agent", action="store_true", help="train the forecaster only")
    parser.add_argument(
        "--skip-transfer", action="store_true", help="skip the horizon (transfer-time) model"
    )
    parser.add_argument(
        "--ema-decay", type=float, help="keep an EMA of the weights (default: the config's)"
    )
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="reuse <out>/forecaster.pt's weights; redo calibration, evaluation and reports",
    )
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="override the epoch cap (an epoch is a fixed number of updates; training "
        "stops there or on early stopping)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: 1)")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        help="optional safety cap in seconds, off by default (0): a run it stops depends "
        "on the machine's speed, so the same command no longer gives the same model",
    )
    parser.add_argument(
        "--agent-gamma",
        type=float,
        help="the agent's discount (default: the origin's 0.99; make train uses 0.8)",
    )
    parser.add_argument(
        "--agent-episodes",
        type=int,
        help="the agent's training episodes (default: the origin's 2000)",
    )
    parser.add_argument(
        "--members",
        type=int,
        help="networks averaged in each model, trained side by side with seeds "
        "seed, seed+1, ... (default 1; make train uses 2)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m trainer.train``."""
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
