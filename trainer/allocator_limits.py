"""``python -m trainer allocator-limits``: what limits the allocation agent.

One job: train the same Double DQN twice on the same crops of ``make
train``'s split, once on the shipped state (the forecaster's point and
interval, :data:`bwpredd.state.STATE_LAYOUT`) and once with the oracle's
knowledge of the next step in its place (point, low and high all equal to the
bandwidth the link will deliver: the state of a perfect forecaster, same
layout), and score both greedy policies on the validation and test splits.

The oracle-state agent is an upper bound for what better forecasts can give
this agent; the one-step oracle bounds everything. So on test, with ``S`` the
shipped-state agent, ``F`` the oracle-state agent and ``O`` the oracle::

    O - S = (F - S)   the part of the gap that is forecast uncertainty
          + (O - F)   the part that is the policy (learning, the state's other
                      features, one-step vs multi-step), known bandwidth or not

Both agents share the config, seed and training budget (by default shorter
than ``make train``'s: one network, ``--episodes``), so the split compares
like with like; the shipped model's own score is beside them in the report.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from bwpredd.schema import BW
from trainer.dqn import AgentConfig, train_loop
from trainer.env import PreparedTrace, prepare_traces
from trainer.evaluate_allocator import (
    evaluate_policies,
    greedy_policy,
    heuristic_policies,
    load_model,
    torch_q_values,
)

__all__ = ["add_arguments", "oracle_state_traces", "run", "split_shares"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
ARMS = ("shipped_state", "oracle_state")


def oracle_state_traces(traces: list[PreparedTrace]) -> list[PreparedTrace]:
    """The same traces with the forecast replaced by the next step's bandwidth:
    point, low and high are what the link will deliver (a perfect forecaster
    with no uncertainty); the state layout is unchanged."""
    out = []
    for tr in traces:
        nxt = tr.data[:, BW].astype(np.float32).copy()
        nxt[np.isnan(tr.point)] = np.nan  # no decision before the first window
        out.append(replace(tr, point=nxt, low=nxt.copy(), high=nxt.copy()))
    return out


def split_shares(shipped: float, oracle_state: float, oracle: float) -> dict[str, float]:
    """The gap ``oracle - shipped`` cut into forecast uncertainty
    (``oracle_state - shipped``) and policy (``oracle - oracle_state``), each
    also as a share of the gap."""
    gap = oracle - shipped
    forecast = oracle_state - shipped
    policy = oracle - oracle_state
    return {
        "gap": gap,
        "forecast_uncertainty": forecast,
        "policy": policy,
        "forecast_uncertainty_share": forecast / gap if abs(gap) > 1e-12 else 0.0,
        "policy_share": policy / gap if abs(gap) > 1e-12 else 0.0,
    }


def _train_arm(
    arm: str, train: list[PreparedTrace], val: list[PreparedTrace], cfg: AgentConfig, seed: int
) -> tuple[str, Any, dict[str, Any]]:
    """One arm's training (module level: it runs in a spawned process)."""
    model, history = train_loop(train, val, cfg, seed, progress=False)
    return arm, model, history


def train_arms(
    prepared: dict[str, list[list[PreparedTrace]]], cfg: AgentConfig, seed: int
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """One agent per arm, trained on the arm's prepared (train, val, ...)
    crops, two at a time in spawned processes: ``{arm: (model, history)}``."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
        futures = [
            pool.submit(_train_arm, arm, parts[0], parts[1], cfg, seed)
            for arm, parts in prepared.items()
        ]
        return {arm: (model, hist) for arm, model, hist in (f.result() for f in futures)}


def run(args: argparse.Namespace) -> int:
    """Train both arms, score them, print the split, write ``--json``."""
    from trainer.train_agent import crop_splits, training_split

    if args.episodes < 1:
        print(f"--episodes: must be >= 1, got {args.episodes}", file=sys.stderr)
        return EXIT_BAD_INPUT
    t0 = time.perf_counter()
    try:
        forecast, _, desc = load_model(args.model)
        train, val, test = training_split(args.traces, args.seed)
    except (OSError, ValueError) as exc:
        print(f"allocator-limits: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cfg = replace(AgentConfig(), gamma=args.gamma, episodes=args.episodes, members=1)
    crops = crop_splits(train, val, test, cfg, args.seed)
    shipped = [prepare_traces(part, forecast) for part in crops]
    prepared = {"shipped_state": shipped, "oracle_state": [oracle_state_traces(p) for p in shipped]}
    print(f"prepared in {time.perf_counter() - t0:.0f} s; training both arms", flush=True)
    trained = train_arms(prepared, cfg, args.seed)
    doc: dict[str, Any] = {
        "model": desc,
        "traces": str(args.traces),
        "seed": args.seed,
        "config": asdict(cfg),
        "arms": {},
    }
    oracle = heuristic_policies()["oracle"]
    for arm in ARMS:
        model, hist = trained[arm]
        pol = {"ddqn": greedy_policy(torch_q_values(model)), "oracle": oracle}
        arm_doc: dict[str, Any] = {
            "best_episode": int(hist["best_episode"]),
            "best_val": float(hist["best_val"]),
            "cpu_seconds": float(hist["cpu_seconds"]),
        }
        for split, traces in (("val", prepared[arm][1]), ("test", prepared[arm][2])):
            res = evaluate_policies(traces, pol)
            arm_doc[split] = {
                "ddqn": res["ddqn"]["macro"]["reward"],
                "oracle": res["oracle"]["macro"]["reward"],
                "per_source": {s: r["reward"] for s, r in res["ddqn"]["per_source"].items()},
            }
        doc["arms"][arm] = arm_doc
    arms = doc["arms"]
    for split in ("val", "test"):
        doc[f"split_{split}"] = split_shares(
            arms["shipped_state"][split]["ddqn"],
            arms["oracle_state"][split]["ddqn"],
            arms["shipped_state"][split]["oracle"],
        )
    doc["seconds"] = time.perf_counter() - t0
    for split in ("val", "test"):
        s = doc[f"split_{split}"]
        print(
            f"{split}: shipped state {arms['shipped_state'][split]['ddqn']:.4f}, oracle state "
            f"{arms['oracle_state'][split]['ddqn']:.4f}, oracle "
            f"{arms['shipped_state'][split]['oracle']:.4f}; forecast uncertainty "
            f"{s['forecast_uncertainty_share']:.2f} of the gap, policy {s['policy_share']:.2f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``allocator-limits`` flags and its handler."""
    parser.add_argument("--traces", type=Path, required=True, help="directory of traces")
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="model directory (or allocator.pt) whose forecaster builds the shipped state",
    )
    parser.add_argument("--seed", type=int, default=0, help="the split's and training's seed")
    parser.add_argument("--episodes", type=int, default=1000, help="training episodes per arm")
    parser.add_argument("--gamma", type=float, default=0.8, help="discount (make train's 0.8)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.set_defaults(func=run)
