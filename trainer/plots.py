"""PNG plots of a training run: the forecaster's forecasts vs actual, learning
curves and error ratios; the allocator's reward curves and an example trace
with each policy's allocation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import numpy.typing as npt

from bwpredd import baselines
from bwpredd.schema import BW, WINDOW
from bwpredd.state import LEVELS
from trainer.env import PreparedTrace
from trainer.evaluate_allocator import Policy, run_policy
from trainer.predict import ForecastFn

__all__ = [
    "pick_traces",
    "plot_allocation_example",
    "plot_forecasts",
    "plot_learning_curve",
    "plot_ratios",
    "plot_reward_curves",
]

F32 = npt.NDArray[np.float32]
MAX_STEPS = 300


def pick_traces(traces: Sequence[Any], n: int = 4) -> list[Any]:
    """Up to ``n`` traces of different sources (real ones first), each the
    median-length trace of its source so the pick is typical and stable."""
    by_source: dict[str, list[Any]] = {}
    for t in traces:
        if len(t.data) > 40:
            by_source.setdefault(t.source, []).append(t)
    order = sorted(by_source, key=lambda s: (s.startswith("synthetic"), s))
    real = [s for s in order if not s.startswith("synthetic")] or order
    # evenly spread over the (alphabetical) real sources, not just the first n
    chosen = [real[int(i)] for i in np.unique(np.linspace(0, len(real) - 1, min(n, len(real))))]
    picked = []
    for source in chosen:
        members = sorted(by_source[source], key=lambda t: (len(t.data), t.name))
        picked.append(members[len(members) // 2])
    return picked


def plot_forecasts(traces: Sequence[Any], predict: ForecastFn, path: Path) -> None:
    """Forecast vs actual with the 80% interval (and last value for
    reference) on the first :data:`MAX_STEPS` steps of each trace.

    Args:
        traces: traces to draw, one panel each.
        predict: window ``[N, WINDOW, WIDTH]`` -> ``(point, low, high)`` each ``[N]``.
        path: the PNG to write.
    """
    from trainer.data.windows import make_windows

    fig, axes = plt.subplots(len(traces), 1, figsize=(11, 2.8 * len(traces)), squeeze=False)
    for ax, trace in zip(axes[:, 0], traces, strict=True):
        w = make_windows([trace])
        n = min(len(w.y), MAX_STEPS)
        x, y = w.x[:n], w.y[:n]
        point, low, high = predict(x)
        steps = np.arange(n)
        ax.fill_between(steps, low, high, color="tab:blue", alpha=0.2, label="model 80% interval")
        ax.plot(steps, y, color="black", lw=1.0, label="actual")
        ax.plot(steps, point, color="tab:blue", lw=1.0, label="model")
        ax.plot(
            steps,
            baselines.last_value(x),
            color="tab:orange",
            lw=0.8,
            ls="--",
            alpha=0.8,
            label="last value",
        )
        ax.set_title(f"{trace.source}: {trace.name}", fontsize=9)
        ax.set_ylabel("Mbit/s")
        ax.set_xlabel(f"window (step {trace.step_s:g} s)")
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_learning_curve(history: dict[str, Any], path: Path) -> None:
    """Training and validation loss per epoch, plus validation coverage, for
    each network when several were trained (``history["members"]``).

    Args:
        history: :meth:`trainer.train_forecaster.History.to_json` output.
        path: the PNG to write.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    members = history.get("members") or [history]
    for i, h in enumerate(members):
        who = f"network {i}: " if len(members) > 1 else ""
        ep = h["epoch"]
        ax1.plot(ep, h["train_loss"], color=f"C{3 * i}", label=f"{who}train loss (sampled)")
        val_ep, val = list(ep), list(h["val_loss"])
        if np.isfinite(h.get("initial_val_loss", np.nan)):
            val_ep, val = [0, *val_ep], [h["initial_val_loss"], *val]
        ax1.plot(val_ep, val, color=f"C{3 * i + 1}", label=f"{who}val loss (epoch 0: untrained)")
        ax1.plot(
            ep, h["val_point"], color=f"C{3 * i + 2}", label=f"{who}val point part (weighted nMAE)"
        )
        if h.get("best_epoch"):
            ax1.axvline(h["best_epoch"], color=f"C{3 * i + 1}", ls=":", lw=1)
        ax2.plot(ep, h["val_coverage"], color=f"C{3 * i + 2}", label=f"{who}val coverage")
    ax1.set_xlabel("epoch (dotted: best)")
    ax1.set_ylabel("loss (per trace mean)")
    ax1.legend(fontsize=7)
    ax2.axhspan(0.75, 0.85, color="tab:green", alpha=0.1, label="target 75-85%")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("80% interval coverage (one network)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratios(result: dict[str, Any], path: Path) -> None:
    """Per source: normalised MAE of the model and of every baseline, divided
    by that source's best baseline (below 1: better than the best baseline).

    Args:
        result: :func:`trainer.evaluate.evaluate_windows` output with a model.
        path: the PNG to write.
    """
    per_source = result["per_source"]
    best = result["best_baseline"]["per_source"]
    sources = sorted(per_source)
    methods = ["model", "last_value", "ewma", "harmonic_mean", "mean"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(methods)
    pos = np.arange(len(sources))
    for k, m in enumerate(methods):
        ratios = [per_source[s][m]["nmae"] / best[s]["nmae"] for s in sources]
        ax.bar(pos + k * width, ratios, width, label=m.replace("_", " "))
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(1.05, color="red", lw=0.8, ls=":", label="1.05 (per-source target)")
    ax.set_xticks(pos + width * (len(methods) - 1) / 2)
    ax.set_xticklabels(sources, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("nMAE / best baseline of the source")
    ax.set_ylim(0.8, 1.6)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("Test split: normalised MAE relative to each source's best baseline")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_curves(
    histories: Sequence[dict[str, Any]], heur_val: dict[str, float], path: Path
) -> None:
    """The Q-networks' per-step reward per episode (training, and the greedy
    policy on the validation split), with the oracle and the best heuristic.

    Args:
        histories: each network's :func:`trainer.dqn.train_loop` history.
        heur_val: ``oracle`` and ``best_heuristic`` validation rewards, if known.
        path: the PNG to write.
    """
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, history in enumerate(histories):
        who = f"network {i}, " if len(histories) > 1 else ""
        curve = np.asarray(history["curve"])
        ax.plot(curve, lw=0.5, alpha=0.3, color=f"C{2 * i}")
        if len(curve) >= 100:
            ma = np.convolve(curve, np.ones(100) / 100, mode="valid")
            ax.plot(
                np.arange(99, len(curve)),
                ma,
                color=f"C{2 * i}",
                label=f"{who}training, 100-episode mean (epsilon-greedy)",
            )
        if history["val_curve"]:
            ep, score = zip(*history["val_curve"], strict=True)
            ax.plot(ep, score, "o-", ms=3, color=f"C{2 * i + 1}", label=f"{who}validation, greedy")
    for name in ("oracle", "best_heuristic"):
        if name in heur_val:
            ax.axhline(heur_val[name], ls="--", lw=1, color="k" if name == "oracle" else "C3")
            ax.annotate(name.replace("_", " "), (0, heur_val[name]), fontsize=8)
    ax.set_xlabel("episode")
    ax.set_ylabel("mean per-step reward")
    ax.set_title("Double DQN allocator: reward per step")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_allocation_example(
    traces: Sequence[PreparedTrace], policies: dict[str, Policy], path: Path, steps: int = 150
) -> str:
    """Bandwidth of one test trace with each policy's allocation drawn over it.

    Args:
        traces: prepared traces to pick the trace from.
        policies: ``{name: policy}`` to draw.
        path: the PNG to write.
        steps: steps drawn.

    Returns:
        ``source/name`` of the trace drawn.
    """
    # The most variable long-enough trace shows the decisions best.
    cand = [i for i, tr in enumerate(traces) if tr.length >= steps + WINDOW]
    if not cand:
        cand = list(range(len(traces)))
    cv = [
        np.std(traces[i].data[:, BW]) / max(float(np.mean(traces[i].data[:, BW])), 1e-6)
        for i in cand
    ]
    i = cand[int(np.argsort(cv)[len(cv) // 2 + len(cv) // 4])] if len(cand) > 3 else cand[0]
    tr = traces[i]
    n = min(steps, tr.length - WINDOW)
    one = [
        replace(
            tr,
            data=tr.data[: n + WINDOW],
            capacity=tr.capacity[: n + WINDOW],
            point=tr.point[: n + WINDOW],
            low=tr.low[: n + WINDOW],
            high=tr.high[: n + WINDOW],
        )
    ]
    t = np.arange(WINDOW, n + WINDOW) * tr.step_s
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(t, tr.data[WINDOW : n + WINDOW, BW], color="k", lw=1.5, label="link bandwidth (trace)")
    for name, pol in policies.items():
        rec = run_policy(one, pol, segment=n, record=True)
        acts = rec["actions"][:, 0]
        alloc = np.asarray(LEVELS)[acts] * tr.capacity[10 : n + 10]
        r = rec["reward"][0] / max(rec["steps"][0], 1)
        ax.step(t, alloc, where="post", lw=1, label=f"{name} (r={r:.2f})")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Mbit/s")
    ax.set_title(f"{tr.source}: {tr.name}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{tr.source}/{tr.name}"
