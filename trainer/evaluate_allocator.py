"""``python -m trainer eval-allocator``: score allocation policies on traces.

One job: run the DDQN allocator (greedy, never random), every fixed level, a
forecast-following heuristic, a conservative heuristic, two one-parameter
quantile rules, a predict-then-optimise rule and a one-step oracle through
:class:`trainer.env.LinkEnv` on a directory of traces, and report each
policy's mean per-step reward, link utilisation, share of steps with a queue
and share with loss, per source and macro-averaged over sources.

The heuristics (everything but ``ddqn`` and ``oracle``) are the rules a DWCP
engineer would write without learning anything; the gap closure is measured
against the strongest of them:

* ``forecast``: the forecaster's point; ``conservative``: its interval's low
  end; ``fixed_<p>``: always ``p``%.
* ``quantile_mix``: ``low + a (point - low)``, the ``a`` of :data:`MIX_GRID`
  that scores best on the tuning traces (the validation split);
  ``scaled_low``: ``b low``, ``b`` from :data:`SCALE_GRID` likewise.
* ``predict_then_optimise``: the level with the highest expected one-step
  reward (:func:`trainer.env.link_step`, the environment's own reward) when
  the link's next bandwidth follows the forecaster's predictive distribution:
  the quantile function through its 10th, 50th and 90th percentiles,
  piecewise linear and extended beyond them with the neighbouring slope
  (floored at 0), read at :data:`PTO_SAMPLES` evenly spaced probabilities.
  The queue it starts from is the one the state shows (``queue_steps``).

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

from bwpredd.state import STATE_LAYOUT
from trainer.env import (
    LEVEL_ARRAY,
    QUEUE_EPS_STEPS,
    EnvConfig,
    LinkEnv,
    PreparedTrace,
    link_step,
    prepare_traces,
    segment_lanes,
)
from trainer.predict import ForecastFn

__all__ = [
    "HEURISTICS",
    "MIX_GRID",
    "ORIGINAL_HEURISTICS",
    "SCALE_GRID",
    "Policy",
    "add_arguments",
    "bootstrap_margin",
    "evaluate_policies",
    "expected_rewards",
    "gap_closure",
    "greedy_policy",
    "heuristic_policies",
    "predict_then_optimise",
    "predictive_samples",
    "quantile_mix",
    "run",
    "run_policy",
    "scaled_low",
    "tune_heuristics",
    "tuned_policies",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
# (env, states [K, S]) -> actions [K]
Policy = Callable[[LinkEnv, F32], I64]
# The policies a DWCP engineer would write without learning anything: the
# first report's set, and the stronger rules added beside them.
ORIGINAL_HEURISTICS = ("forecast", "conservative", *(f"fixed_{p}" for p in range(10, 101, 10)))
TUNED_RULES = ("quantile_mix", "scaled_low")
HEURISTICS = (*ORIGINAL_HEURISTICS, *TUNED_RULES, "predict_then_optimise")
# quantile_mix's a (0 is conservative, 1 forecast-following, above 1 beyond
# the point) and scaled_low's b, each chosen on the tuning traces.
MIX_GRID: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(13))
SCALE_GRID: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(17))
# Resamples of the traces behind the DDQN's margin over the best heuristic.
BOOTSTRAP_REPS = 1000
# Evenly spaced probabilities the predictive distribution is read at.
PTO_SAMPLES = 20
# The forecaster's interval: its 10th and 90th percentiles (manifest "interval").
LOW_Q, HIGH_Q = 0.1, 0.9
QUEUE_COLUMN = STATE_LAYOUT.index("queue_steps")
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


def quantile_mix(a: float) -> Policy:
    """Send at ``low + a (point - low)`` of the forecaster's quantiles."""

    def act(env: LinkEnv, states: F32) -> I64:
        cap, point, low, _ = env.forecasts()
        return nearest_level((low + a * (point - low)) / cap)

    return act


def scaled_low(b: float) -> Policy:
    """Send at ``b`` times the forecaster's interval low end."""

    def act(env: LinkEnv, states: F32) -> I64:
        cap, _, low, _ = env.forecasts()
        return nearest_level(b * low / cap)

    return act


def predictive_samples(
    point: npt.NDArray[np.floating],
    low: npt.NDArray[np.floating],
    high: npt.NDArray[np.floating],
    n: int = PTO_SAMPLES,
) -> npt.NDArray[np.float64]:
    """``[K, n]`` equally likely next bandwidths under the forecaster's
    predictive distribution: its quantile function through ``(0.1, low)``,
    ``(0.5, point)``, ``(0.9, high)``, piecewise linear, extended beyond the
    interval with the neighbouring slope and floored at 0, read at the
    probabilities ``(j + 0.5) / n``."""
    p = np.asarray(point, np.float64)[:, None]
    lo = np.minimum(np.asarray(low, np.float64)[:, None], p)
    hi = np.maximum(np.asarray(high, np.float64)[:, None], p)
    u = ((np.arange(n) + 0.5) / n)[None, :]
    below = p + (u - 0.5) * (p - lo) / (0.5 - LOW_Q)
    above = p + (u - 0.5) * (hi - p) / (HIGH_Q - 0.5)
    samples: npt.NDArray[np.float64] = np.maximum(np.where(u < 0.5, below, above), 0.0)
    return samples


def expected_rewards(
    queue: npt.NDArray[np.floating],
    capacity: npt.NDArray[np.floating],
    samples: npt.NDArray[np.floating],
    step_s: npt.NDArray[np.floating],
    cfg: EnvConfig,
) -> npt.NDArray[np.float64]:
    """``[K, 10]`` mean one-step reward of each level over the bandwidth
    ``samples [K, n]``, from ``queue`` Mbit, by the environment's reward."""
    r = link_step(
        np.asarray(queue, np.float64)[:, None, None],
        LEVEL_ARRAY[None, :, None],
        np.asarray(capacity, np.float64)[:, None, None],
        np.asarray(samples, np.float64)[:, None, :],
        np.asarray(step_s, np.float64)[:, None, None],
        cfg=cfg,
    )["reward"]
    mean: npt.NDArray[np.float64] = r.mean(axis=2)
    return mean


def predict_then_optimise(env: LinkEnv, states: F32) -> I64:
    """The level maximising the expected one-step reward under the
    forecaster's predictive distribution, from the queue the state shows."""
    cap, point, low, high = env.forecasts()
    cap = np.maximum(cap, 1e-3)
    queue = np.maximum(states[:, QUEUE_COLUMN].astype(np.float64), 0.0) * cap * env.step_s
    er = expected_rewards(queue, cap, predictive_samples(point, low, high), env.step_s, env.cfg)
    best: I64 = er.argmax(axis=1).astype(np.int64)
    return best


def tuned_policies(params: dict[str, Any]) -> dict[str, Policy]:
    """The quantile rules at their tuned parameters, and predict-then-optimise.

    Args:
        params: :func:`tune_heuristics`'s result (``quantile_mix.a``,
            ``scaled_low.b``).
    """
    return {
        "quantile_mix": quantile_mix(float(params["quantile_mix"]["a"])),
        "scaled_low": scaled_low(float(params["scaled_low"]["b"])),
        "predict_then_optimise": predict_then_optimise,
    }


def tune_heuristics(
    traces: Sequence[PreparedTrace],
    segment: int = DEFAULT_SEGMENT,
    cfg: EnvConfig | None = None,
) -> dict[str, Any]:
    """Choose ``quantile_mix``'s ``a`` and ``scaled_low``'s ``b`` on ``traces``
    (the validation split): the grid value with the best macro reward.

    Returns:
        ``{"quantile_mix": {"a", "grid"}, "scaled_low": {"b", "grid"}}``, each
        grid mapping the parameter (as a string) to its macro reward.
    """
    grids = {
        ("quantile_mix", "a"): {a: quantile_mix(a) for a in MIX_GRID},
        ("scaled_low", "b"): {b: scaled_low(b) for b in SCALE_GRID},
    }
    out: dict[str, Any] = {}
    for (name, param), pols in grids.items():
        res = evaluate_policies(traces, {f"{v:g}": p for v, p in pols.items()}, segment, cfg)
        scores = {k: r["macro"]["reward"] for k, r in res.items()}
        best = max(pols, key=lambda v: scores[f"{v:g}"])
        out[name] = {param: best, "grid": scores}
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
    # Per-trace sums for the bootstrap in report(); not written to JSON.
    traces_sums = {"source": src, "reward": sums["reward"], "steps": sums["steps"]}
    return {"macro": macro, "per_source": per_source, "_traces": traces_sums}


def bootstrap_margin(
    results: dict[str, dict[str, Any]],
    a: str,
    b: str,
    sources: Sequence[str] | None = None,
    *,
    reps: int = BOOTSTRAP_REPS,
    seed: int = 0,
) -> tuple[float, float]:
    """A 90% interval of the macro reward of ``a`` minus that of ``b``,
    resampling whole traces within each source (paired: the same traces for
    both policies), over ``sources`` (default: all).

    Returns:
        ``(5th, 95th percentile)``.
    """
    ta, tb = results[a]["_traces"], results[b]["_traces"]
    src = ta["source"]
    rng = np.random.default_rng(seed)
    per_source = []
    for s in sources if sources is not None else sorted(set(src.tolist())):
        idx = np.nonzero((src == s) & (ta["steps"] > 0))[0]
        if len(idx) == 0:
            continue
        pick = idx[rng.integers(0, len(idx), (reps, len(idx)))]
        steps = ta["steps"][pick].sum(axis=1)
        per_source.append((ta["reward"][pick].sum(axis=1) - tb["reward"][pick].sum(axis=1)) / steps)
    diff = np.mean(per_source, axis=0)
    lo, hi = np.percentile(diff, [5, 95])
    return float(lo), float(hi)


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


def gap_closure(
    policies: dict[str, float], heuristics: Sequence[str] = HEURISTICS
) -> tuple[str, float]:
    """The best heuristic and ``(ddqn - best) / (oracle - best)``.

    Args:
        policies: macro reward per policy, with ``ddqn`` and ``oracle``.
        heuristics: the policies that count as heuristics.
    """
    best = max((n for n in policies if n in heuristics), key=lambda n: policies[n])
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
        # Against the first report's heuristics only (fixed, forecast, conservative).
        out["best_original_heuristic"], out["gap_closure_original"] = gap_closure(
            policies, ORIGINAL_HEURISTICS
        )
        out["ddqn_beats_every_heuristic"] = all(
            policies["ddqn"] >= policies[n] for n in policies if n in HEURISTICS
        )
        # Per source: the strongest heuristic there, and whether the DDQN beats it.
        per: dict[str, Any] = {}
        for s in results["ddqn"]["per_source"]:
            scores = {n: r["per_source"][s]["reward"] for n, r in results.items()}
            top = max((n for n in scores if n in HEURISTICS), key=lambda n: scores[n])
            per[s] = {
                "best_heuristic": top,
                "margin": scores["ddqn"] - scores[top],
                "ddqn_wins": bool(scores["ddqn"] >= scores[top]),
            }
        out["per_source_wins"] = per
        # Is the margin over the strongest heuristic more than noise? Resampling
        # the traces of each source; an interval across 0 means within noise.
        out["margin_over_best_heuristic"] = policies["ddqn"] - policies[best]
        out["margin_over_best_heuristic_90ci"] = list(bootstrap_margin(results, "ddqn", best))
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
            (
                out["best_original_heuristic_real_sources"],
                out["gap_closure_original_real_sources"],
            ) = gap_closure(pr, ORIGINAL_HEURISTICS)
            best_real = out["best_heuristic_real_sources"]
            out["margin_over_best_heuristic_real_sources"] = pr["ddqn"] - pr[best_real]
            out["margin_over_best_heuristic_real_sources_90ci"] = list(
                bootstrap_margin(results, "ddqn", best_real, real)
            )
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
    tune = parser.add_mutually_exclusive_group()
    tune.add_argument(
        "--tune-traces",
        type=Path,
        default=None,
        help="traces the quantile rules' parameters are chosen on (e.g. a validation "
        "split); default: the evaluated traces themselves (in-sample, which favours the rules)",
    )
    tune.add_argument(
        "--heuristic-params",
        type=Path,
        default=None,
        help="take the quantile rules' parameters from an earlier JSON's "
        '"heuristic_params" (e.g. reports/allocator_eval.json)',
    )
    parser.set_defaults(func=run)


def read_heuristic_params(path: Path) -> dict[str, Any]:
    """The ``heuristic_params`` of an earlier eval JSON, checked.

    Raises:
        ValueError: the file has no usable ``heuristic_params``.
    """
    try:
        doc = json.loads(path.read_text())
        params = doc["heuristic_params"]
        a, b = float(params["quantile_mix"]["a"]), float(params["scaled_low"]["b"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: heuristic_params: must hold quantile_mix.a and scaled_low.b ({exc!r})"
        ) from exc
    if not (np.isfinite(a) and np.isfinite(b)):
        raise ValueError(f"{path}: heuristic_params: a and b must be finite")
    return {
        "quantile_mix": {"a": a},
        "scaled_low": {"b": b},
        "tuned_on": str(params.get("tuned_on", path)),
    }


def run(args: argparse.Namespace) -> int:
    """Evaluate every policy on ``--traces``; print a table, write ``--json``."""
    from bwpredd.traces import load_traces

    try:
        forecast, q, desc = load_model(args.model)
        loaded = load_traces(args.traces)
        params = read_heuristic_params(args.heuristic_params) if args.heuristic_params else None
        tune_loaded = load_traces(args.tune_traces) if args.tune_traces else None
    except (OSError, ValueError) as exc:
        print(f"eval-allocator: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    traces = prepare_traces(loaded.traces, forecast)
    if not traces:
        print(f"eval-allocator: no usable traces under {args.traces}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if params is None:
        tune_on = traces
        where = f"{args.traces} (in-sample: the evaluated traces themselves)"
        if tune_loaded is not None:
            tune_on = prepare_traces(tune_loaded.traces, forecast)
            where = str(args.tune_traces)
            if not tune_on:
                print(f"eval-allocator: no usable traces under {args.tune_traces}", file=sys.stderr)
                return EXIT_BAD_INPUT
        params = {**tune_heuristics(tune_on, args.segment), "tuned_on": where}
    policies = {"ddqn": greedy_policy(q), **heuristic_policies(), **tuned_policies(params)}
    results = evaluate_policies(traces, policies, args.segment)
    doc = report(results)
    doc["heuristic_params"] = params
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
    lines = [f"{'policy':<22}{'reward':>9}{'util':>8}{'queue':>8}{'loss':>8}"]
    for name in sorted(pol, key=lambda n: -pol[n]):
        lines.append(
            f"{name:<22}{pol[name]:>9.4f}{doc['utilisation'][name]:>8.3f}"
            f"{doc['queue_share'][name]:>8.3f}{doc['loss_share'][name]:>8.3f}"
        )
    if "gap_closure" in doc:
        lines.append(
            f"best heuristic {doc['best_heuristic']}; gap closure {doc['gap_closure']:.3f} "
            f"(against the original heuristics, best {doc['best_original_heuristic']}: "
            f"{doc['gap_closure_original']:.3f})"
        )
    return "\n".join(lines)
