"""The allocator's report: ``allocator.md``.

Written from measured numbers only: the policies' scores on the test and
validation splits (:func:`trainer.evaluate_allocator.report`), the training
metrics of :func:`trainer.train_agent.train_agent` and, when they were run,
``trainer allocator-limits``' split of the gap and ``trainer
allocator-state``'s richer states. The forecaster's report is
:mod:`trainer.report`.

``python -m trainer report-allocator`` rewrites the report for a shipped
model directory without training: it rebuilds ``make train``'s split for the
seed, re-scores the model's forecaster and allocator (onnxruntime) on the
validation crops and the whole test split, tunes the quantile rules on
validation, and takes the training figures from the manifest.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainer.dqn import ORIGIN_HYPERPARAMETERS, AgentConfig

__all__ = ["add_arguments", "departures", "render_markdown", "run"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def departures(config: dict[str, Any]) -> str:
    """The line saying which of the origin's hyperparameters this run changed.

    Args:
        config: the run's :class:`trainer.dqn.AgentConfig` as a dict.
    """
    origin = AgentConfig()
    changed = [
        f"{name} {config[name]} (origin {getattr(origin, name)})"
        for name in ORIGIN_HYPERPARAMETERS
        if config.get(name) != getattr(origin, name)
    ]
    if not changed:
        return "* hyperparameters: the origin's (episodes, gamma, epsilon, replay, batch, sync)"
    return (
        "* departures from the origin's hyperparameters, chosen on the validation "
        "split (README, Allocation): " + ", ".join(changed)
    )


def _training_line(metrics: dict[str, Any]) -> str:
    """What the training run did, per network when there were several."""
    if "members" not in metrics:
        return "* training: not recorded (the model directory's manifest has no figures)"
    members = metrics["members"]
    head = (
        f"* training: {metrics['episodes']} episodes, {metrics['updates']} updates, "
        f"{metrics['train_seconds']:.0f} s wall, {metrics['train_cpu_seconds']:.0f} s CPU; "
    )
    tail = f"final epsilon {metrics['final_epsilon']:.4f}"
    if len(members) == 1:
        m = members[0]
        return head + (
            f"best validation at episode {m['best_episode']}; converged at episode "
            f"{m['converged_episode']}; last-100-episode training reward "
            f"{m['avg_reward_last_100']:.4f} (epsilon-greedy); " + tail
        )
    each = "; ".join(
        f"network {i} (seed {m['seed']}): best validation at episode {m['best_episode']}, "
        f"converged at episode {m['converged_episode']}, last-100-episode training reward "
        f"{m['avg_reward_last_100']:.4f}"
        for i, m in enumerate(members)
    )
    return (
        f"* training: {len(members)} Q-networks trained side by side, each "
        f"{metrics['episodes']} episodes, their Q-values averaged when serving; "
        f"{metrics['updates']} updates, {metrics['train_seconds']:.0f} s wall, "
        f"{metrics['train_cpu_seconds']:.0f} s CPU; {each}; " + tail
    )


def _wins_line(doc: dict[str, Any]) -> str:
    """Per-source wins against the strongest heuristic of each source."""
    wins = doc["per_source_wins"]
    real = [src for src in wins if not src.startswith("synthetic")]
    n_real = sum(wins[src]["ddqn_wins"] for src in real)
    lost = [
        f"{src} ({wins[src]['best_heuristic']} by {-wins[src]['margin']:.3f})"
        for src in wins
        if not wins[src]["ddqn_wins"]
    ]
    return (
        f"* per source, DDQN >= every heuristic on **{n_real} of {len(real)} real sources** "
        f"({sum(w['ddqn_wins'] for w in wins.values())} of {len(wins)} with the synthetic "
        "profiles)" + (f"; it loses on {', '.join(lost)}" if lost else "")
    )


def _noise_line(doc: dict[str, Any]) -> str:
    """The DDQN's margin over the strongest heuristic with its bootstrap interval."""
    lo, hi = doc["margin_over_best_heuristic_90ci"]
    verdict = (
        "**within noise**: the rule is as good as the agent here"
        if lo <= 0 <= hi
        else ("the agent is ahead beyond noise" if lo > 0 else "the rule is ahead beyond noise")
    )
    line = (
        f"* DDQN minus `{doc['best_heuristic']}`: {doc['margin_over_best_heuristic']:+.4f}, "
        f"90% interval [{lo:+.4f}, {hi:+.4f}] (traces resampled within each source): {verdict}"
    )
    if "margin_over_best_heuristic_real_sources_90ci" in doc:
        rlo, rhi = doc["margin_over_best_heuristic_real_sources_90ci"]
        line += (
            f"; real sources only, against `{doc['best_heuristic_real_sources']}`: "
            f"{doc['margin_over_best_heuristic_real_sources']:+.4f} [{rlo:+.4f}, {rhi:+.4f}]"
        )
    return line


def _params_line(doc: dict[str, Any]) -> str:
    params = doc.get("heuristic_params")
    if not params:
        return "* quantile rules: not tuned"
    return (
        f"* quantile rules tuned on {params.get('tuned_on', 'the validation split')}: "
        f"`quantile_mix` a = {params['quantile_mix']['a']:g} (low + a (point - low)), "
        f"`scaled_low` b = {params['scaled_low']['b']:g} (b low); `predict_then_optimise` "
        "has no parameter (expected one-step reward under the forecaster's quantiles)"
    )


def _limits_lines(limits: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """The item "what limits the agent": shipped state vs next step known."""
    arms = limits["arms"]
    sh, orc = arms["shipped_state"]["test"], arms["oracle_state"]["test"]
    split, val_split = limits["split_test"], limits["split_val"]
    cfg = limits["config"]
    pol = doc["policies"]
    lines = [
        "## What limits the agent: forecast uncertainty or policy",
        "",
        "The same Double DQN trained twice on the same crops, seed and budget "
        f"({cfg['episodes']} episodes, one network, gamma {cfg['gamma']}; shorter than the "
        "shipped model's training): once on the shipped state, once with the oracle's "
        "knowledge of the next step in it (the forecast's point, low and high all set to "
        "the bandwidth the link will deliver; same layout). Command: `python -m trainer "
        f"allocator-limits --traces TRACES --model MODEL --seed {limits['seed']} "
        f"--episodes {cfg['episodes']} --json reports/allocator_limits.json`.",
        "",
        "| test, macro over sources | shipped state | next step known | one-step oracle |",
        "|---|---:|---:|---:|",
        f"| reward | {sh['ddqn']:.4f} | {orc['ddqn']:.4f} | {sh['oracle']:.4f} |",
        "",
        f"* gap to the oracle of the shipped-state agent: {split['gap']:.4f}; knowing the "
        f"next step closes {split['forecast_uncertainty']:.4f} of it "
        f"(**{split['forecast_uncertainty_share']:.0%} forecast uncertainty**), the rest, "
        f"{split['policy']:.4f} (**{split['policy_share']:.0%} policy**), stays with "
        "the bandwidth known",
        f"* validation: forecast uncertainty {val_split['forecast_uncertainty_share']:.0%}, "
        f"policy {val_split['policy_share']:.0%}",
        f"* beside them: the shipped agent (longer training, two networks) {pol['ddqn']:.4f}, "
        f"`{doc['best_heuristic']}` {pol[doc['best_heuristic']]:.4f}",
        "",
        "| source | shipped state | next step known | oracle |",
        "|---|---:|---:|---:|",
    ]
    oracle_src = doc["per_source"]
    for src, v in sh["per_source"].items():
        o = oracle_src.get(src, {}).get("oracle", {}).get("reward", float("nan"))
        lines.append(f"| {src} | {v:.3f} | {orc['per_source'][src]:.3f} | {o:.3f} |")
    lines.append("")
    return lines


def _state_lines(states: list[dict[str, Any]]) -> list[str]:
    """The item "a richer state": ``allocator-state``'s arms on validation and
    test, one row per arm and training seed (the runs share the split)."""
    first = states[0]
    cfg = first["config"]
    variants = {v: k for st in states for v, k in st["variants"].items()}
    seeds = ", ".join(str(st.get("train_seed", st["seed"])) for st in states)
    lines = [
        "## A richer state: the horizon forecaster's quantiles",
        "",
        "The same agent and budget as above (split seed "
        f"{first['seed']}, {cfg['episodes']} episodes, one network; training seeds {seeds}), "
        "trained on the shipped state and on the shipped state plus the horizon "
        "forecaster's 10th/50th/90th percentiles of the mean bandwidth over the next k "
        "steps, over the reference capacity (environment and reward unchanged); a variant "
        f"must beat the shipped state on validation by more than {first.get('win_margin', 0.01)} "
        "to count. Command: `python -m trainer allocator-state --traces TRACES --model MODEL "
        f"--seed {first['seed']} [--train-seed N] --episodes {cfg['episodes']} --variants "
        f"{','.join(variants)} --json reports/allocator_state.json --report "
        "reports/allocator_state.md` (per source: `reports/allocator_state*.md`).",
        "",
        "| state | steps ahead | training seed | validation | test "
        "| validation - shipped (90% interval) | test, real sources >= predict_then_optimise |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for st in states:
        val, test = st["val"], st["test"]
        arms = sorted(val["arms"], key=lambda a: (a != "shipped_state", a))
        for arm in arms:
            v, t = val["arms"][arm], test["arms"][arm]
            ahead = ", ".join(str(k) for k in variants.get(arm, [])) or "-"
            diff = ""
            if "minus_shipped" in v:
                lo, hi = v["minus_shipped_90ci"]
                diff = f"{v['minus_shipped']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            w = t["wins_vs_predict_then_optimise"]
            lines.append(
                f"| {arm} | {ahead} | {st.get('train_seed', st['seed'])} | {v['ddqn']:.4f} "
                f"| {t['ddqn']:.4f} | {diff} | {w['real_wins']} of {w['real_of']} |"
            )
    lines += [
        f"| predict_then_optimise | | | {first['val']['predict_then_optimise']:.4f} "
        f"| {first['test']['predict_then_optimise']:.4f} | | |",
        "",
    ]
    lines += [
        f"* training seed {st.get('train_seed', st['seed'])}: {st['verdict']}" for st in states
    ]
    lines.append("")
    return lines


def render_markdown(  # noqa: PLR0917 (the report's inputs)
    doc: dict[str, Any],
    val_doc: dict[str, Any],
    metrics: dict[str, Any],
    example: str,
    limits: dict[str, Any] | None = None,
    generated_by: str = "`trainer/train_agent.py` (`make train`)",
    state: list[dict[str, Any]] | None = None,
) -> str:
    """``allocator.md``.

    Args:
        doc: :func:`trainer.evaluate_allocator.report` of the test split.
        val_doc: the same for the validation split.
        metrics: :func:`trainer.train_agent.train_agent`'s metrics.
        example: ``source/name`` of the trace in ``allocator_example.png``.
        limits: ``allocator-limits``' JSON, if run.
        generated_by: the command that wrote the report.
        state: ``allocator-state``'s JSONs (one per training seed), if run.
    """
    pol = doc["policies"]
    best, orig = doc["best_heuristic"], doc["best_original_heuristic"]
    lines = [
        "# Allocator: Double DQN in the fluid-queue link environment",
        "",
        f"Generated by {generated_by}. Environment and reward: "
        "`trainer/env.py` (module docstring). Mean **per-step** reward in [-1, 1], "
        "macro-averaged over sources; held-out **test** split (by file/group); "
        "checkpoint and the quantile rules' parameters selected on the validation split. "
        "Heuristics (`trainer/evaluate_allocator.py`): fixed levels, `forecast` (the "
        "point), `conservative` (the interval's low end), `quantile_mix` and `scaled_low` "
        "(one-parameter quantile rules) and `predict_then_optimise` (the level with the "
        "highest expected one-step reward under the forecaster's quantiles).",
        "",
        f"* DDQN test macro reward: **{pol['ddqn']:.4f}**; strongest heuristic "
        f"`{best}` {pol[best]:.4f}; oracle {pol['oracle']:.4f}",
        f"* gap closure (ddqn - best) / (oracle - best) against the strongest heuristic: "
        f"**{doc['gap_closure']:.3f}** (target >= 0.30); against the first report's "
        f"heuristics (best `{orig}` {pol[orig]:.4f}): {doc['gap_closure_original']:.3f}",
        f"* DDQN >= every heuristic (macro): **{doc['ddqn_beats_every_heuristic']}**",
        _noise_line(doc),
        _wins_line(doc),
        *(
            [
                f"* real sources only (synthetic excluded): ddqn "
                f"{doc['policies_real_sources']['ddqn']:.4f}, strongest heuristic "
                f"`{doc['best_heuristic_real_sources']}` "
                f"{doc['policies_real_sources'][doc['best_heuristic_real_sources']]:.4f}, "
                f"oracle {doc['policies_real_sources']['oracle']:.4f}, gap closure "
                f"**{doc['gap_closure_real_sources']:.3f}** (against the first report's "
                f"heuristics {doc['gap_closure_original_real_sources']:.3f})"
            ]
            if "policies_real_sources" in doc
            else []
        ),
        f"* validation (the selection split; each trace cropped to "
        f"{metrics['config']['crop_steps']} steps): ddqn {val_doc['policies']['ddqn']:.4f}, "
        f"strongest heuristic `{val_doc['best_heuristic']}` "
        f"{val_doc['policies'][val_doc['best_heuristic']]:.4f}, oracle "
        f"{val_doc['policies']['oracle']:.4f}, gap closure {val_doc['gap_closure']:.3f} "
        f"(against the first report's heuristics {val_doc['gap_closure_original']:.3f})",
        _params_line(doc),
        _training_line(metrics),
        f"* forecast in the state: {metrics['forecast']}",
        departures(metrics["config"]),
        "",
        "## Test split, macro over sources",
        "",
        "| policy | reward | utilisation | steps with queue | steps with loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in sorted(pol, key=lambda n: -pol[n]):
        mark = " (strongest heuristic)" if name == best else ""
        lines.append(
            f"| {name}{mark} | {pol[name]:.4f} | {doc['utilisation'][name]:.3f} | "
            f"{doc['queue_share'][name]:.3f} | {doc['loss_share'][name]:.3f} |"
        )
    show = [
        "ddqn",
        "oracle",
        best,
        "predict_then_optimise",
        "quantile_mix",
        "scaled_low",
        "conservative",
        "forecast",
    ]
    show = [n for n in dict.fromkeys(show) if n in pol]
    lines += [
        "",
        "## Test split, per source (reward)",
        "",
        "| source | steps | "
        + " | ".join(show)
        + " | best fixed | strongest heuristic here | ddqn - it |",
        "|---|---:|" + "---:|" * (len(show) + 1) + "---|---:|",
    ]
    for src, d in doc["per_source"].items():
        fixed = max((n for n in d if n.startswith("fixed_")), key=lambda n: d[n]["reward"])
        cells = " | ".join(f"{d[n]['reward']:.3f}" for n in show)
        w = doc["per_source_wins"][src]
        lines.append(
            f"| {src} | {d['ddqn']['steps']} | {cells} | {fixed} {d[fixed]['reward']:.3f} | "
            f"{w['best_heuristic']} | {w['margin']:+.3f} |"
        )
    lines.append("")
    if limits is not None:
        lines += _limits_lines(limits, doc)
    if state:
        lines += _state_lines(state)
    lines += [
        "![reward curve](allocator_reward.png)",
        "",
        f"Example ({example}): ![example](allocator_example.png)",
        "",
        '## Beside the origin\'s "average reward above 0.85"',
        "",
        "The origin's figure is not comparable. Its environment never used bandwidth and "
        "its next state did not depend on the action, so its reward scored agreement with "
        "a hand-written rule, and any policy that copied the rule reached it. Here the "
        "reward is the link's outcome per step (utilisation minus queue and loss "
        "penalties), the action changes the next state, and 1.0 is only reachable by "
        "knowing the next step's bandwidth: the one-step oracle itself scores "
        f"{pol['oracle']:.3f}, and the strongest rule a DWCP engineer would write scores "
        f"{pol[best]:.3f}. Our per-step figure ({pol['ddqn']:.3f}) should be "
        "read against those two, not against 0.85.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``report-allocator`` flags and its handler."""
    parser.add_argument("--traces", type=Path, required=True, help="make train's traces")
    parser.add_argument(
        "--model", type=Path, required=True, help="the shipped model directory to re-score"
    )
    parser.add_argument("--seed", type=int, default=0, help="make train's seed (the split)")
    parser.add_argument("--reports", type=Path, default=Path("reports"), help="output directory")
    parser.add_argument(
        "--limits",
        type=Path,
        default=None,
        help="allocator-limits' JSON to include (default: <reports>/allocator_limits.json "
        "if it exists)",
    )
    parser.add_argument(
        "--state",
        type=Path,
        nargs="*",
        default=None,
        help="allocator-state's JSONs to include, one per training seed (default: "
        "<reports>/allocator_state*.json)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Re-score ``--model`` on ``make train``'s validation and test splits and
    rewrite ``allocator.md``, ``allocator_eval.json`` and
    ``allocator_example.png`` (the reward curve needs the training run and is
    left as it is)."""
    from trainer.dqn import AgentConfig
    from trainer.env import prepare_traces
    from trainer.evaluate_allocator import (
        evaluate_policies,
        greedy_policy,
        heuristic_policies,
        load_model,
        report,
        tune_heuristics,
        tuned_policies,
    )
    from trainer.plots import plot_allocation_example
    from trainer.train_agent import crop_splits, training_split

    try:
        manifest = json.loads((args.model / "manifest.json").read_text())
        # The training figures the export recorded; a directory without them
        # is scored with the default crops and says so.
        metrics = manifest.get("evaluation", {}).get("allocator") or {}
        cfg = AgentConfig(**metrics.get("config", {}))
        metrics = {"forecast": "the model directory's forecaster", **metrics}
        metrics["config"] = asdict(cfg)
        forecast, q, _ = load_model(args.model)
        train, val, test = training_split(args.traces, args.seed)
        limits_path = args.limits or args.reports / "allocator_limits.json"
        limits = json.loads(limits_path.read_text()) if limits_path.exists() else None
        state_paths = (
            args.state
            if args.state is not None
            else sorted(args.reports.glob("allocator_state*.json"))
        )
        state = [json.loads(p.read_text()) for p in state_paths]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"report-allocator: {exc!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _, val_c, test_c = crop_splits(train, val, test, cfg, args.seed)
    val_p, test_p = prepare_traces(val_c, forecast), prepare_traces(test_c, forecast)
    params = {**tune_heuristics(val_p), "tuned_on": "the validation split"}
    policies = {"ddqn": greedy_policy(q), **heuristic_policies(), **tuned_policies(params)}
    val_doc = report(evaluate_policies(val_p, policies))
    test_doc = {**report(evaluate_policies(test_p, policies)), "heuristic_params": params}
    args.reports.mkdir(parents=True, exist_ok=True)
    (args.reports / "allocator_eval.json").write_text(
        json.dumps({**test_doc, "split": "test", "seed": args.seed}, indent=2, sort_keys=True)
        + "\n"
    )
    shown = ("ddqn", "oracle", "conservative", "predict_then_optimise")
    example = plot_allocation_example(
        test_p, {k: policies[k] for k in shown}, args.reports / "allocator_example.png"
    )
    cmd = (
        f"`python -m trainer report-allocator --model {args.model} --seed {args.seed}` "
        "(the shipped model re-scored on `make train`'s split; training figures from its "
        "manifest)"
    )
    (args.reports / "allocator.md").write_text(
        render_markdown(test_doc, val_doc, metrics, example, limits, cmd, state)
    )
    print(
        f"test: ddqn {test_doc['policies']['ddqn']:.4f}, strongest heuristic "
        f"{test_doc['best_heuristic']} {test_doc['policies'][test_doc['best_heuristic']]:.4f}, "
        f"gap closure {test_doc['gap_closure']:.3f} (original heuristics "
        f"{test_doc['gap_closure_original']:.3f}); wrote {args.reports}/allocator.md"
    )
    return EXIT_OK
