"""Train the allocation agent: data -> Q-networks -> evaluation -> reports.

One job: :func:`train_agent` crops and prepares the traces
(:mod:`trainer.data.episodes`, the forecaster's point and interval in each
state), trains one Q-network per member with :func:`trainer.dqn.train_loop`
(the Double DQN loop), scores every policy on the test traces once
(:mod:`trainer.evaluate_allocator`), and writes ``allocator.pt`` plus
``reports/allocator.md`` (:mod:`trainer.report_allocator`), its PNGs
(:mod:`trainer.plots`) and ``reports/allocator_eval.json``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bwpredd.state import STATE_LAYOUT
from trainer.data.episodes import crop_traces, with_synthetic
from trainer.dqn import QUICK, AgentConfig, train_loop
from trainer.env import prepare_traces
from trainer.evaluate_allocator import (
    evaluate_policies,
    greedy_policy,
    heuristic_policies,
    report,
    torch_q_values,
    tune_heuristics,
    tuned_policies,
)
from trainer.members import train_members
from trainer.models.qnet import QNetwork, save_checkpoint
from trainer.predict import ForecastFn, forecast_fn

__all__ = ["crop_splits", "train_agent", "training_split"]

REPO = Path(__file__).resolve().parents[1]


def training_split(
    traces_dir: Path, seed: int, progress: bool = False
) -> tuple[list[Any], list[Any], list[Any]]:
    """``make train``'s (``trainer train``, not ``--quick``) train, validation
    and test traces for ``seed``: the real traces of ``traces_dir`` and the
    synthetic profiles, split by fold group exactly as that run split them.
    Files of no known format are named on stderr; ``progress`` shows a bar
    while the traces load.

    Raises:
        OSError: ``traces_dir`` cannot be read.
        ValueError: it holds no trace.
    """
    from bwpredd.traces import load_traces
    from trainer.data.synthetic import synthetic_traces
    from trainer.data.windows import split_traces
    from trainer.train import N_SYNTHETIC, SPLIT_FRACTIONS, SYNTHETIC_LENGTH

    loaded = load_traces(Path(traces_dir), progress=progress)
    for item in loaded.unknown:
        print(f"unknown file (not used): {item}", file=sys.stderr)
    real = list(loaded.traces)
    if not real:
        raise ValueError(f"{traces_dir}: no usable traces")
    synthetic = synthetic_traces(seed, n_traces=N_SYNTHETIC, length=SYNTHETIC_LENGTH)
    train, val, test = split_traces(real + synthetic, SPLIT_FRACTIONS, seed=seed)
    return train, val, test


def crop_splits(  # noqa: PLR0917 (the three splits, as train_agent takes them)
    train_traces: Sequence[Any],
    val_traces: Sequence[Any],
    test_traces: Sequence[Any],
    cfg: AgentConfig,
    seed: int,
    quick: bool = False,
) -> tuple[list[Any], list[Any], list[Any]]:
    """The train, validation and test traces of a training run, as the
    environment sees them (before the forecaster runs over them).

    The forecaster runs once over every window of every trace it is given;
    on 2 cores that is most of the budget for the long traces (puffer alone
    is half the steps), so train and validation see a seeded crop of at most
    ``cfg.crop_steps`` steps of each trace (the synthetic profiles join train
    unless ``quick``). The test split is scored whole (cropped too when
    ``quick``). The same ``seed`` gives the same crops.
    """
    crop_rng = np.random.default_rng([seed, 1])
    train_in = with_synthetic(list(train_traces), seed, quick)
    train_c = crop_traces(train_in, cfg.crop_steps, crop_rng, cfg.latency_jitter)
    val_c = crop_traces(list(val_traces), cfg.crop_steps, crop_rng)
    test_in = list(test_traces)
    test_c = crop_traces(test_in, cfg.crop_steps, crop_rng) if quick else test_in
    return train_c, val_c, test_c


def train_agent(  # noqa: PLR0917 (the orchestrator's contract)
    train_traces: Sequence[Any],
    val_traces: Sequence[Any],
    test_traces: Sequence[Any],
    forecaster_path: Path | None,
    out_dir: Path,
    seed: int,
    quick: bool = False,
    reports_dir: Path | None = None,
    config: AgentConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the allocator and write ``out_dir/allocator.pt`` and the reports.

    Args:
        train_traces: traces episodes are drawn from (the synthetic profiles
            are added unless present or ``quick``).
        val_traces: traces the best checkpoint is selected on.
        test_traces: held-out traces, scored once at the end.
        forecaster_path: ``forecaster.pt`` whose point and interval enter the
            state; None uses the EWMA baseline.
        out_dir: where ``allocator.pt`` goes.
        seed: makes the run reproducible.
        quick: a seconds-long run (tests, bootstrapping).
        reports_dir: where the report goes; default ``reports/`` of the repo,
            or ``out_dir/reports`` when ``quick``.
        config: hyperparameters; default the origin's (or :data:`QUICK`).
        progress: show progress bars.

    Returns:
        ``ddqn_metrics``: per-step reward over the last 100 training episodes,
        final epsilon, the converged episode, validation and test scores.
    """
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    cfg = config or (QUICK if quick else AgentConfig())
    out_dir.mkdir(parents=True, exist_ok=True)
    reports_dir = reports_dir or (out_dir / "reports" if quick else REPO / "reports")
    reports_dir.mkdir(parents=True, exist_ok=True)

    forecast: ForecastFn | None = None
    forecast_desc = "EWMA baseline + baseline_interval"
    if forecaster_path is not None and Path(forecaster_path).exists():
        from trainer.models.forecaster import load_checkpoint as load_forecaster

        fmodel, _ = load_forecaster(str(forecaster_path))
        forecast = forecast_fn(fmodel)
        forecast_desc = f"forecaster {forecaster_path}"
    train_p, val_p, test_p = (
        prepare_traces(part, forecast)
        for part in crop_splits(train_traces, val_traces, test_traces, cfg, seed, quick)
    )
    prep_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    n = max(cfg.members, 1)
    jobs = [
        {
            "train": train_p,
            "val": val_p,
            "cfg": cfg,
            "seed": seed + i,
            "progress": progress,
        }
        for i in range(n)
    ]
    model, hists = train_members(train_loop, jobs, QNetwork.merge)
    # CPU seconds as well as wall: on a shared 2-core box the wall time says
    # more about the neighbours than about the run.
    train_s = time.perf_counter() - t1
    train_cpu = sum(h["cpu_seconds"] for h in hists)

    q = torch_q_values(model)
    # The quantile rules' parameters are chosen on validation, like the checkpoint.
    tune_on = val_p or test_p
    params: dict[str, Any] = (
        {**tune_heuristics(tune_on), "tuned_on": "the validation split"}
        if tune_on
        else {"quantile_mix": {"a": 0.5}, "scaled_low": {"b": 1.0}, "tuned_on": "nothing"}
    )
    if tune_on and not val_p:
        params["tuned_on"] = "the test split (no validation split)"
    policies = {"ddqn": greedy_policy(q), **heuristic_policies(), **tuned_policies(params)}
    val_doc = report(evaluate_policies(val_p, policies)) if val_p else {}
    test_doc = report(evaluate_policies(test_p, policies)) if test_p else {}
    if test_doc:
        test_doc["heuristic_params"] = params
    members = [
        {
            "seed": int(h["seed"]),
            "avg_reward_last_100": float(np.mean(h["curve"][-100:])),
            "converged_episode": _converged_episode(np.asarray(h["curve"])),
            "best_episode": int(h["best_episode"]),
            "best_val": float(h["best_val"]),
            "updates": int(h["updates"]),
            "seconds": float(h["seconds"]),
            "cpu_seconds": float(h["cpu_seconds"]),
        }
        for h in hists
    ]
    # With several networks: their mean training reward, and the episode by
    # which every one of them had converged.
    metrics: dict[str, Any] = {
        "avg_reward_last_100": float(np.mean([m["avg_reward_last_100"] for m in members])),
        "final_epsilon": float(hists[0]["final_epsilon"]),
        "converged_episode": max(m["converged_episode"] for m in members),
        "best_episode": [m["best_episode"] for m in members]
        if n > 1
        else members[0]["best_episode"],
        "episodes": cfg.episodes,
        "updates": sum(m["updates"] for m in members),
        "members": members,
        "train_seconds": train_s,
        "train_cpu_seconds": train_cpu,
        "prepare_seconds": prep_s,
        "forecast": forecast_desc,
        "config": asdict(cfg),
        "val_reward": val_doc.get("policies", {}).get("ddqn"),
        "test_reward": test_doc.get("policies", {}).get("ddqn"),
        "test_policies": test_doc.get("policies"),
        "test_gap_closure": test_doc.get("gap_closure"),
        "test_best_heuristic": test_doc.get("best_heuristic"),
        "val_gap_closure": val_doc.get("gap_closure"),
    }
    save_checkpoint(
        model,
        str(out_dir / "allocator.pt"),
        state_layout=list(STATE_LAYOUT),
        metrics=json.loads(json.dumps(metrics)),
        seed=seed,
    )
    if test_doc:
        from trainer.plots import plot_allocation_example, plot_reward_curves
        from trainer.report_allocator import render_markdown

        (reports_dir / "allocator_eval.json").write_text(
            json.dumps({**test_doc, "split": "test", "seed": seed}, indent=2, sort_keys=True) + "\n"
        )
        heur_val = {}
        if val_doc:
            heur_val = {
                "oracle": val_doc["policies"]["oracle"],
                "best_heuristic": val_doc["policies"][val_doc["best_heuristic"]],
            }
        plot_reward_curves(hists, heur_val, reports_dir / "allocator_reward.png")
        shown = {
            k: v
            for k, v in policies.items()
            if k in ("ddqn", "oracle", "conservative", "predict_then_optimise")
        }
        example = plot_allocation_example(test_p, shown, reports_dir / "allocator_example.png")
        if val_doc:
            (reports_dir / "allocator.md").write_text(
                render_markdown(test_doc, val_doc, metrics, example)
            )
    metrics["total_seconds"] = time.perf_counter() - t0
    return metrics


def _converged_episode(curve: npt.NDArray[np.float64], window: int = 100, tol: float = 0.05) -> int:
    """First episode after which the ``window``-episode moving average stays
    within ``tol`` of its final value."""
    if len(curve) < window:
        return len(curve)
    ma = np.convolve(curve, np.ones(window) / window, mode="valid")
    outside = np.nonzero(np.abs(ma - ma[-1]) > tol)[0]
    first = 0 if len(outside) == 0 else int(outside[-1]) + 1
    return int(first + window)
