"""``python -m trainer allocator-state``: does a richer state help the agent?

One job: train the same Double DQN on the same crops, seed and budget as
``trainer allocator-limits`` (one network, ``--episodes``), once on the
shipped state (:data:`bwpredd.state.STATE_LAYOUT`) and once per richer state
named by ``--variants``, and score every greedy policy on the validation split
(the selection split) and the test split, beside ``predict_then_optimise``
(the strongest validation-tuned heuristic) and the one-step oracle.

The richer states append columns to the shipped ones; the environment and
the reward are unchanged (:class:`trainer.env.LinkEnv` only concatenates
the columns the traces carry). Each variant adds the model directory's
horizon forecaster's predictive distribution: for each of its look-ahead
steps ``k``, the 10th, 50th and 90th percentiles of the mean bandwidth over
the next ``k`` steps (``k * step_s`` seconds, read off the horizon curves as
:meth:`bwpredd.transfer.HorizonCurves.at` interpolates them), over the
reference capacity, clipped as :func:`bwpredd.state.build_state` clips. Like
the next-step forecast, they are computed once per trace on the trace's own
windows (:mod:`trainer.env`'s docstring says why that is exact enough).

* ``horizon``: steps 1, 2, 3, 4 (the discount 0.8 weighs about five steps);
* ``lookahead``: steps 1, 2, 4, 8, 16 (further ahead than the discount sees).

A variant *wins* only if its validation macro reward beats the shipped
state's by more than :data:`WIN_MARGIN`; the test figures are reported, not
selected on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bwpredd.schema import WINDOW
from bwpredd.state import STATE_LAYOUT, reference_capacity
from bwpredd.transfer import HorizonCurves
from trainer.allocator_limits import train_arms
from trainer.dqn import AgentConfig
from trainer.env import PreparedTrace, prepare_traces
from trainer.evaluate_allocator import (
    bootstrap_margin,
    evaluate_policies,
    greedy_policy,
    heuristic_policies,
    load_model,
    predict_then_optimise,
    torch_q_values,
)

__all__ = [
    "VARIANTS",
    "WIN_MARGIN",
    "add_arguments",
    "horizon_columns",
    "horizon_features",
    "render_markdown",
    "run",
]

F32 = npt.NDArray[np.float32]
# (windows [N, W, WIDTH], step_s [N]) -> mean, low, high [N, H] Mbit/s
HorizonFn = Callable[[F32, F32], tuple[F32, F32, F32]]
VARIANTS: dict[str, tuple[int, ...]] = {"horizon": (1, 2, 3, 4), "lookahead": (1, 2, 4, 8, 16)}
# A variant must beat the shipped state on validation by more than this.
WIN_MARGIN = 0.01
# The state's clip (bwpredd.state.build_state).
CLIP = 50.0
CHUNK = 8192
EXIT_OK = 0
EXIT_BAD_INPUT = 2


def horizon_columns(steps: Sequence[int]) -> tuple[str, ...]:
    """Names of the extra columns for look-ahead ``steps``, in order."""
    return tuple(f"h{k}_{q}_over_capacity" for k in steps for q in ("median", "low", "high"))


def horizon_features(
    traces: Sequence[PreparedTrace],
    run_horizon: HorizonFn,
    horizons: Sequence[float],
    steps: Sequence[int],
    window: int = WINDOW,
) -> list[PreparedTrace]:
    """The traces with the horizon forecaster's quantiles at ``steps`` steps
    ahead as extra state columns (:func:`horizon_columns`), one batched call
    over every window of every trace.

    Args:
        traces: prepared traces (the shipped state's).
        run_horizon: the horizon graph: windows and their step lengths to
            median, low, high over ``horizons``.
        horizons: the graph's horizons, seconds.
        steps: look-ahead steps, each >= 1.
        window: window length.
    """
    if not steps or min(steps) < 1:  # an empty tuple names no column
        raise ValueError(f"steps: must be one or more ints >= 1, got {list(steps)}")
    if not traces:
        return []
    wins, dts = [], []
    for tr in traces:
        win = np.lib.stride_tricks.sliding_window_view(tr.data, (window, tr.data.shape[1]))[:-1, 0]
        wins.append(win)
        dts.append(np.full(len(win), tr.step_s, np.float32))
    stacked = np.concatenate(wins).astype(np.float32)
    dt = np.concatenate(dts)
    parts = [
        run_horizon(np.ascontiguousarray(stacked[i : i + CHUNK]), dt[i : i + CHUNK])
        for i in range(0, len(stacked), CHUNK)
    ]
    mean, low, high = (np.concatenate(p) for p in zip(*parts, strict=True))
    curves = HorizonCurves.from_outputs(horizons, mean, low, high)
    cap = np.maximum(reference_capacity(stacked).astype(np.float64), 1e-3)
    cols = []
    for k in steps:
        for q in curves.at(k * dt.astype(np.float64)):
            cols.append(q / cap)
    feats = np.clip(np.stack(cols, axis=1), -CLIP, CLIP).astype(np.float32)
    out, offset = [], 0
    for tr, win in zip(traces, wins, strict=True):
        n = len(win)
        extra = np.full((n + window, feats.shape[1]), np.nan, np.float32)
        extra[window:] = feats[offset : offset + n]
        offset += n
        out.append(replace(tr, extra=extra))
    return out


def _per_source(res: dict[str, Any]) -> dict[str, float]:
    return {s: float(r["reward"]) for s, r in res["per_source"].items()}


def _wins(arm: dict[str, float], rule: dict[str, float]) -> dict[str, Any]:
    """Sources where the agent scores at least the rule, all and real ones."""
    won = sorted(s for s in arm if arm[s] >= rule[s])
    real = [s for s in arm if not s.startswith("synthetic")]
    return {
        "sources": won,
        "wins": len(won),
        "of": len(arm),
        "real_wins": sum(1 for s in won if s in real),
        "real_of": len(real),
    }


def score_arms(
    prepared: dict[str, list[list[PreparedTrace]]], models: dict[str, Any]
) -> dict[str, Any]:
    """Every arm's greedy policy on validation and test, beside
    ``predict_then_optimise`` and the oracle (scored once: neither reads the
    extra columns), with per-source wins and, against the shipped arm, a 90%
    interval of the macro difference (traces resampled within each source)."""
    out: dict[str, Any] = {}
    first = next(iter(prepared))
    for si, split in enumerate(("val", "test"), start=1):
        base = evaluate_policies(
            prepared[first][si],
            {
                "predict_then_optimise": predict_then_optimise,
                "oracle": heuristic_policies()["oracle"],
            },
        )
        pto = _per_source(base["predict_then_optimise"])
        doc: dict[str, Any] = {
            "predict_then_optimise": base["predict_then_optimise"]["macro"]["reward"],
            "oracle": base["oracle"]["macro"]["reward"],
            "predict_then_optimise_per_source": pto,
            "arms": {},
        }
        results = {}
        for arm, model in models.items():
            pol = {"ddqn": greedy_policy(torch_q_values(model))}
            res = evaluate_policies(prepared[arm][si], pol)
            results[arm] = res["ddqn"]
            per = _per_source(res["ddqn"])
            doc["arms"][arm] = {
                "ddqn": res["ddqn"]["macro"]["reward"],
                "per_source": per,
                "wins_vs_predict_then_optimise": _wins(per, pto),
            }
        if "shipped_state" in results:
            for arm, res_arm in results.items():
                if arm == "shipped_state":
                    continue
                pair = {"a": res_arm, "b": results["shipped_state"]}
                doc["arms"][arm]["minus_shipped"] = (
                    doc["arms"][arm]["ddqn"] - doc["arms"]["shipped_state"]["ddqn"]
                )
                doc["arms"][arm]["minus_shipped_90ci"] = list(bootstrap_margin(pair, "a", "b"))
        out[split] = doc
    return out


def render_markdown(doc: dict[str, Any], command: str) -> str:
    """``reports/allocator_state.md`` from :func:`run`'s JSON document."""
    val, test = doc["val"], doc["test"]
    arms = list(test["arms"])
    lines = [
        "# Allocator: a richer state (issue 21 item 3)",
        "",
        f"Generated by `{command}`. The same Double DQN as `trainer allocator-limits` "
        f"(same crops, split seed {doc['seed']}, "
        f"training seed {doc.get('train_seed', doc['seed'])}, "
        f"{doc['config']['episodes']} episodes, one network, "
        f"gamma {doc['config']['gamma']}), trained on the shipped state and on richer ones "
        "(extra columns appended; environment and reward unchanged). Macro reward over "
        "sources; the validation split selects, the test split is reported. A variant wins "
        f"only if it beats the shipped state on validation by more than {WIN_MARGIN}.",
        "",
        "Variants: "
        + "; ".join(
            f"`{a}`: the horizon forecaster's 10th/50th/90th percentiles of the mean "
            f"bandwidth over the next {', '.join(str(k) for k in doc['variants'][a])} steps, "
            "over the reference capacity"
            for a in arms
            if a in doc["variants"]
        )
        + ".",
        "",
        "| state | columns | validation | test | val - shipped (90% interval) | test - shipped "
        "| wins vs predict_then_optimise, test (real sources) | best episode |",
        "|---|---:|---:|---:|---|---:|---|---:|",
    ]
    for a in arms:
        v, t = val["arms"][a], test["arms"][a]
        w = t["wins_vs_predict_then_optimise"]
        if "minus_shipped" in v:
            lo, hi = v["minus_shipped_90ci"]
            dv = f"{v['minus_shipped']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            dt = f"{t['minus_shipped']:+.4f}"
        else:
            dv, dt = "", ""
        lines.append(
            f"| {a} | {doc['columns'][a]} | {v['ddqn']:.4f} | {t['ddqn']:.4f} | {dv} | {dt} "
            f"| {w['wins']} of {w['of']} ({w['real_wins']} of {w['real_of']}) "
            f"| {doc['training'][a]['best_episode']} |"
        )
    lines += [
        f"| predict_then_optimise | | {val['predict_then_optimise']:.4f} "
        f"| {test['predict_then_optimise']:.4f} | | | | |",
        f"| oracle | | {val['oracle']:.4f} | {test['oracle']:.4f} | | | | |",
        "",
        "Per source, test (reward):",
        "",
        "| source | " + " | ".join(arms) + " | predict_then_optimise |",
        "|---|" + "---:|" * (len(arms) + 1),
    ]
    pto = test["predict_then_optimise_per_source"]
    for s in sorted(pto):
        row = " | ".join(f"{test['arms'][a]['per_source'][s]:.3f}" for a in arms)
        lines.append(f"| {s} | {row} | {pto[s]:.3f} |")
    lines += ["", "Verdict on validation: " + doc["verdict"], ""]
    return "\n".join(lines)


def _verdict(doc: dict[str, Any]) -> str:
    val = doc["val"]["arms"]
    winners = [
        a for a in val if a != "shipped_state" and val[a].get("minus_shipped", 0.0) > WIN_MARGIN
    ]
    if winners:
        return (
            f"{', '.join(winners)} beat the shipped state by more than {WIN_MARGIN} on "
            "validation (check another seed before believing it)."
        )
    best = max((a for a in val if a != "shipped_state"), key=lambda a: val[a]["minus_shipped"])
    return (
        f"no variant beats the shipped state by more than {WIN_MARGIN} on validation "
        f"(best: {best}, {val[best]['minus_shipped']:+.4f}); the shipped state stays."
    )


def run(args: argparse.Namespace) -> int:
    """Train the shipped-state arm and one per variant; score them; write
    ``--json`` and ``--report``."""
    from bwpredd import modeldir
    from trainer.train_agent import crop_splits, training_split

    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if not variants or unknown:
        print(
            f"--variants: must name one or more of {', '.join(VARIANTS)}, got {args.variants!r}",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    if args.episodes < 1:
        print(f"--episodes: must be >= 1, got {args.episodes}", file=sys.stderr)
        return EXIT_BAD_INPUT
    # The split and the crops follow --seed (make train's); the networks' own
    # seed may differ, to see how much the seed alone moves an arm.
    train_seed = args.seed if args.train_seed is None else args.train_seed
    t0 = time.perf_counter()
    try:
        if not args.model.is_dir():
            raise ValueError(f"{args.model}: must be a model directory (the horizon graph)")
        loaded = modeldir.load_model(args.model, threads=2)
        if loaded.horizon is None:
            raise ValueError(f"{args.model}: the model directory declares no horizons")
        forecast, _, desc = load_model(args.model)
        train, val, test = training_split(args.traces, args.seed)
    except (OSError, ValueError) as exc:
        print(f"allocator-state: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = replace(AgentConfig(), gamma=args.gamma, episodes=args.episodes, members=1)
    crops = crop_splits(train, val, test, cfg, args.seed)
    shipped = [prepare_traces(part, forecast) for part in crops]
    prepared = {"shipped_state": shipped}
    for v in variants:
        prepared[v] = [
            horizon_features(p, loaded.run_horizon, loaded.manifest.horizons, VARIANTS[v])
            for p in shipped
        ]
    print(
        f"prepared in {time.perf_counter() - t0:.0f} s; training {len(prepared)} arms", flush=True
    )
    trained = train_arms(prepared, cfg, train_seed)
    doc: dict[str, Any] = {
        "model": desc,
        "traces": str(args.traces),
        "seed": args.seed,
        "train_seed": train_seed,
        "config": asdict(cfg),
        "variants": {v: list(VARIANTS[v]) for v in variants},
        "win_margin": WIN_MARGIN,
        "columns": {
            arm: len(STATE_LAYOUT) + len(horizon_columns(VARIANTS.get(arm, ()))) for arm in prepared
        },
        "training": {
            arm: {
                "best_episode": int(h["best_episode"]),
                "best_val": float(h["best_val"]),
                "cpu_seconds": float(h["cpu_seconds"]),
            }
            for arm, (_, h) in trained.items()
        },
    }
    doc.update(score_arms(prepared, {arm: m for arm, (m, _) in trained.items()}))
    doc["verdict"] = _verdict(doc)
    doc["seconds"] = time.perf_counter() - t0
    for split in ("val", "test"):
        d = doc[split]
        arms = ", ".join(f"{a} {r['ddqn']:.4f}" for a, r in d["arms"].items())
        print(
            f"{split}: {arms}; predict_then_optimise {d['predict_then_optimise']:.4f}, "
            f"oracle {d['oracle']:.4f}"
        )
    print(doc["verdict"])
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if args.report is not None:
        command = " ".join(["python -m trainer allocator-state", *sys.argv[2:]])
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(render_markdown(doc, command))
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``allocator-state`` flags and its handler."""
    parser.add_argument("--traces", type=Path, required=True, help="directory of traces")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="model directory: its forecaster builds the shipped state, its horizon graph "
        "the richer ones",
    )
    parser.add_argument("--seed", type=int, default=0, help="the split's and training's seed")
    parser.add_argument(
        "--train-seed",
        type=int,
        default=None,
        help="the networks' seed (default: --seed); the split and crops stay --seed's",
    )
    parser.add_argument("--episodes", type=int, default=1000, help="training episodes per arm")
    parser.add_argument("--gamma", type=float, default=0.8, help="discount (make train's 0.8)")
    parser.add_argument(
        "--variants",
        default="horizon,lookahead",
        help=f"comma-separated richer states beside the shipped one: {', '.join(VARIANTS)}",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--report", type=Path, default=None, help="write a markdown report here")
    parser.set_defaults(func=run)
