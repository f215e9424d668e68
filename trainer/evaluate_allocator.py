"""``python -m trainer eval-allocator``: score allocation policies on traces.

One job: run the DDQN allocator (greedy, never random), every fixed level, a
forecast-following heuristic, a conservative heuristic and a one-step oracle
through :class:`trainer.env.LinkEnv` on a directory of traces, and report each
policy's mean per-step reward, link utilisation, share of steps with a queue
and share with loss, per source and macro-averaged over sources.

Every step ``t >= 10`` of every trace is scored exactly once: traces are cut
into consecutive segments of at most ``--segment`` steps that run side by side
(each starts with an empty queue), so a 7-hour trace costs no more wall time
than a 3-minute one.

``--model`` is either a model directory (``manifest.json``, ``forecaster.onnx``
and ``allocator.onnx``, run through onnxruntime exactly as the daemon does) or
a torch ``allocator.pt`` (with ``forecaster.pt`` beside it, else the EWMA
forecast).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from trainer.env import (
    LEVEL_ARRAY,
    QUEUE_EPS_STEPS,
    EnvConfig,
    LinkEnv,
    PreparedTrace,
    prepare_traces,
    segment_lanes,
)
from trainer.predict import ForecastFn

__all__ = [
    "HEURISTICS",
    "Policy",
    "add_arguments",
    "evaluate_policies",
    "gap_closure",
    "greedy_policy",
    "heuristic_policies",
    "run",
    "run_policy",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
# (env, states [K, S]) -> actions [K]
Policy = Callable[[LinkEnv, F32], I64]
# The policies a DWCP engineer would write without learning anything.
HEURISTICS = ("forecast", "conservative", *(f"fixed_{p}" for p in range(10, 101, 10)))
DEFAULT_SEGMENT = 500
EXIT_OK = 0
EXIT_BAD_INPUT = 2


def nearest_level(fraction: npt.NDArray[np.floating]) -> I64:
    """The action whose level is nearest ``fraction`` of the reference capacity."""
    frac = np.nan_to_num(np.asarray(fraction, np.float64), nan=1.0)
    nearest: I64 = np.abs(frac[:, None] - LEVEL_ARRAY[None, :]).argmin(axis=1).astype(np.int64)
    return nearest


def heuristic_policies() -> dict[str, Policy]:
    """Fixed levels, forecast-following, conservative, and the oracle."""

    def fixed(a: int) -> Policy:
        return lambda env, states: np.full(env.k, a, dtype=np.int64)

    def forecast(env: LinkEnv, states: F32) -> I64:
        cap, point, _, _ = env.forecasts()
        return nearest_level(point / cap)

    def conservative(env: LinkEnv, states: F32) -> I64:
        cap, _, low, _ = env.forecasts()
        return nearest_level(low / cap)

    def oracle(env: LinkEnv, states: F32) -> I64:
        # Knows this step's bandwidth and the queue: the best one-step action.
        best: I64 = env.preview()["reward"].argmax(axis=1).astype(np.int64)
        return best

    out: dict[str, Policy] = {"forecast": forecast, "conservative": conservative}
    out.update({f"fixed_{(a + 1) * 10}": fixed(a) for a in range(10)})
    out["oracle"] = oracle
    return out


def greedy_policy(q_values: Callable[[F32], F32]) -> Policy:
    """Serve ``argmax_a Q(s, a)``: greedy, deterministic, never exploring.

    Args:
        q_values: states ``[K, S]`` -> Q-values ``[K, 10]``.
    """

    def act(env: LinkEnv, states: F32) -> I64:
        greedy: I64 = np.asarray(q_values(states)).argmax(axis=1).astype(np.int64)
        return greedy

    return act


def torch_q_values(model: Any) -> Callable[[F32], F32]:
    """A torch Q-network as a numpy function (eval mode, no grad)."""
    import torch

    model.eval()

    def q(states: F32) -> F32:
        with torch.no_grad():
            values: F32 = model(torch.from_numpy(np.ascontiguousarray(states, np.float32))).numpy()
        return values

    return q


def run_policy(
    traces: Sequence[PreparedTrace],
    policy: Policy,
    segment: int = DEFAULT_SEGMENT,
    cfg: EnvConfig | None = None,
    record: bool = False,
) -> dict[str, Any]:
    """Run one policy over every step of every trace.

    Args:
        traces: prepared traces.
        policy: the policy.
        segment: longest segment, in steps.
        cfg: the link constants.
        record: also return per-lane per-step actions and rewards.

    Returns:
        Per-trace sums: ``steps``, ``reward``, ``util``, ``queued``, ``lossy``
        (each ``[n_traces]``), plus ``actions`` ``[steps, K]`` and ``lanes`` if
        ``record``.
    """
    env = LinkEnv(traces, cfg)
    lanes = segment_lanes(traces, segment, env.cfg.window)
    n = len(traces)
    sums = {k: np.zeros(n) for k in ("steps", "reward", "util", "queued", "lossy")}
    if not lanes:
        return sums
    states = env.reset(lanes)
    owner = np.array([lane[0] for lane in lanes])
    actions_log = []
    rewards_log = []
    while not env.finished.all():
        actions = policy(env, states)
        res = env.step(actions)
        live = res.info["live"]
        np.add.at(sums["steps"], owner, live)
        np.add.at(sums["reward"], owner, res.reward)
        np.add.at(sums["util"], owner, res.info["util"])
        np.add.at(sums["queued"], owner, live * (res.info["queue_steps"] > QUEUE_EPS_STEPS))
        np.add.at(sums["lossy"], owner, live * (res.info["drop"] > 0))
        if record:
            actions_log.append(np.where(live > 0, actions, -1))
            rewards_log.append(res.reward)
        states = res.state
    if record:
        sums["actions"] = np.stack(actions_log)
        sums["rewards"] = np.stack(rewards_log)
        sums["lanes"] = np.asarray(lanes)
    return sums


def summarise(traces: Sequence[PreparedTrace], sums: dict[str, Any]) -> dict[str, Any]:
    """Per-source step-weighted means and their macro average over sources."""
    sources = sorted({tr.source for tr in traces})
    src = np.array([tr.source for tr in traces])
    per_source: dict[str, dict[str, float]] = {}
    for s in sources:
        m = src == s
        steps = float(sums["steps"][m].sum())
        if steps == 0:
            continue
        per_source[s] = {
            "reward": float(sums["reward"][m].sum() / steps),
            "utilisation": float(sums["util"][m].sum() / steps),
            "queue_share": float(sums["queued"][m].sum() / steps),
            "loss_share": float(sums["lossy"][m].sum() / steps),
            "steps": int(steps),
        }
    keys = ("reward", "utilisation", "queue_share", "loss_share")
    macro = {k: float(np.mean([v[k] for v in per_source.values()])) for k in keys}
    return {"macro": macro, "per_source": per_source}


def evaluate_policies(
    traces: Sequence[PreparedTrace],
    policies: dict[str, Policy],
    segment: int = DEFAULT_SEGMENT,
    cfg: EnvConfig | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`summarise` of :func:`run_policy` for each named policy."""
    return {
        name: summarise(traces, run_policy(traces, pol, segment, cfg))
        for name, pol in policies.items()
    }


def gap_closure(policies: dict[str, float]) -> tuple[str, float]:
    """The best heuristic and ``(ddqn - best) / (oracle - best)``.

    Args:
        policies: macro reward per policy, with ``ddqn`` and ``oracle``.
    """
    best = max((n for n in policies if n in HEURISTICS), key=lambda n: policies[n])
    denom = policies["oracle"] - policies[best]
    ratio = (policies["ddqn"] - policies[best]) / denom if denom > 1e-12 else 0.0
    return best, float(ratio)


def report(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON document: macro reward per policy, then details."""
    policies = {name: r["macro"]["reward"] for name, r in results.items()}
    out: dict[str, Any] = {"policies": policies}
    if "ddqn" in policies and "oracle" in policies:
        best, ratio = gap_closure(policies)
        out["best_heuristic"] = best
        out["gap_closure"] = ratio
        out["ddqn_beats_every_heuristic"] = all(
            policies["ddqn"] >= policies[n] for n in policies if n in HEURISTICS
        )
    # The blind set is real traces: also give the macro over real sources.
    real = [s for s in next(iter(results.values()))["per_source"] if not s.startswith("synthetic")]
    if real and len(real) < len(next(iter(results.values()))["per_source"]):
        pr = {
            n: float(np.mean([r["per_source"][s]["reward"] for s in real]))
            for n, r in results.items()
        }
        out["policies_real_sources"] = pr
        if "ddqn" in pr and "oracle" in pr:
            out["best_heuristic_real_sources"], out["gap_closure_real_sources"] = gap_closure(pr)
    out["utilisation"] = {n: r["macro"]["utilisation"] for n, r in results.items()}
    out["queue_share"] = {n: r["macro"]["queue_share"] for n, r in results.items()}
    out["loss_share"] = {n: r["macro"]["loss_share"] for n, r in results.items()}
    sources = sorted({s for r in results.values() for s in r["per_source"]})
    out["per_source"] = {
        s: {n: r["per_source"][s] for n, r in results.items() if s in r["per_source"]}
        for s in sources
    }
    return out


# --------------------------------------------------------------------------- models


def load_model(path: Path) -> tuple[ForecastFn | None, Callable[[F32], F32], str]:
    """The forecaster and the allocator's Q-function from a model directory
    (ONNX, loaded and checked as the daemon does) or a torch ``allocator.pt``.

    Returns:
        ``(forecast or None for EWMA, q_values, description)``.
    """
    from bwpredd import modeldir
    from bwpredd.state import STATE_LAYOUT

    if path.is_dir():
        loaded = modeldir.load_model(path, threads=2)

        def forecast(windows: F32) -> tuple[F32, F32, F32]:
            parts = [
                loaded.run_forecaster(np.ascontiguousarray(windows[i : i + 8192], np.float32))
                for i in range(0, len(windows), 8192)
            ]
            point, low, high = (
                np.concatenate(p).astype(np.float32) for p in zip(*parts, strict=True)
            )
            return point, low, high

        def q(states: F32) -> F32:
            return np.asarray(loaded.q_values(np.ascontiguousarray(states, np.float32)))

        return forecast, q, f"model directory {path} (onnxruntime)"
    from trainer.models import forecaster as fmod
    from trainer.models import qnet
    from trainer.predict import forecast_fn

    model, ckpt = qnet.load_checkpoint(str(path))
    layout = ckpt.get("state_layout")
    if layout is not None and tuple(layout) != STATE_LAYOUT:  # type: ignore[arg-type]
        raise ValueError(f"{path}: state_layout differs from bwpredd.state.STATE_LAYOUT")
    fpath = path.parent / "forecaster.pt"
    fc: ForecastFn | None = None
    desc = f"torch checkpoint {path}, EWMA forecast"
    if fpath.exists():
        fmodel, _ = fmod.load_checkpoint(str(fpath))
        fc = forecast_fn(fmodel)
        desc = f"torch checkpoint {path}, forecaster {fpath}"
    return fc, torch_q_values(model), desc


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``eval-allocator`` flags and its handler."""
    parser.add_argument("--traces", type=Path, required=True, help="directory of traces")
    parser.add_argument(
        "--model", type=Path, required=True, help="model directory, or an allocator.pt"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--segment", type=int, default=DEFAULT_SEGMENT, help="longest segment, in steps"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate every policy on ``--traces``; print a table, write ``--json``."""
    from bwpredd.traces import load_traces

    try:
        forecast, q, desc = load_model(args.model)
        loaded = load_traces(args.traces)
    except (OSError, ValueError) as exc:
        print(f"eval-allocator: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    traces = prepare_traces(loaded.traces, forecast)
    if not traces:
        print(f"eval-allocator: no usable traces under {args.traces}", file=sys.stderr)
        return EXIT_BAD_INPUT
    policies = {"ddqn": greedy_policy(q), **heuristic_policies()}
    results = evaluate_policies(traces, policies, args.segment)
    doc = report(results)
    doc["model"] = desc
    doc["traces"] = str(args.traces)
    doc["n_traces"] = len(traces)
    print(format_table(doc))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return EXIT_OK


def format_table(doc: dict[str, Any]) -> str:
    """A plain-text table: policies by macro reward, best first."""
    pol = doc["policies"]
    lines = [f"{'policy':<14}{'reward':>9}{'util':>8}{'queue':>8}{'loss':>8}"]
    for name in sorted(pol, key=lambda n: -pol[n]):
        lines.append(
            f"{name:<14}{pol[name]:>9.4f}{doc['utilisation'][name]:>8.3f}"
            f"{doc['queue_share'][name]:>8.3f}{doc['loss_share'][name]:>8.3f}"
        )
    if "gap_closure" in doc:
        lines.append(
            f"best heuristic {doc['best_heuristic']}; gap closure {doc['gap_closure']:.3f}"
        )
    return "\n".join(lines)
