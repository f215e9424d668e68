"""Train the horizon forecaster (:mod:`trainer.models.horizon`) and judge it.

``python -m trainer train-transfer`` runs this part alone; ``python -m
trainer train`` (``make train``) runs it after the forecaster, on the same
split. Steps:

1. **Examples**: up to :data:`POINTS_PER_TRACE` windows per training trace
   (plus :func:`steady_traces`: links that hold their rate, at every step
   the traces have, which no real source shows long enough at a 0.5 s step)
   (evenly spaced); each with its step (the median gap of the window's
   times, as the daemon reads it) and, per horizon, the mean bandwidth the
   trace delivered over the next h seconds (:func:`trainer.eval_transfer.mean_over`),
   missing where the trace ends first (masked in the loss).
2. **Training**: pinball loss on ``ln(mean / g)`` at the 10th, 50th and 90th
   percentiles, every source weighing the same (the synthetic profiles half
   each, as in the forecaster's training), Adam, the best weights on the
   validation loss kept.
3. **Calibration** on the validation split's real sources, per horizon: each
   of the three quantiles is shifted (log space) so the source-weighted share
   of validation targets below it is its level: a conformal widening that
   puts the interval's coverage at 80% at every horizon, and so (the time to
   deliver B bits is at most t exactly when the bits delivered by t reach B)
   the time interval's too.
4. **Evaluation** on the test split with :mod:`trainer.eval_transfer`'s
   protocol.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bwpredd.schema import BW, LAT, REL, WIDTH, WINDOW
from trainer.eval_transfer import (
    SYNTHETIC_PREFIX,
    cumulative,
    evaluate_points,
    format_table,
    mean_over,
    sample_points,
    window_steps,
)
from trainer.models.horizon import HorizonConfig, HorizonNet, save_checkpoint

__all__ = ["TransferTrainConfig", "add_arguments", "calibrate", "examples", "train_transfer"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
POINTS_PER_TRACE = 400
_BW = BW


@dataclass
class TransferTrainConfig:
    """The training loop's settings (defaults: what ``make train`` runs)."""

    seed: int = 0
    steps: int = 8000
    batch: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-5
    eval_every: int = 250
    patience: int = 6  # evaluations without improvement
    threads: int = 1
    points_per_trace: int = POINTS_PER_TRACE
    synthetic_weight: float = 0.5
    trace_balance: bool = False  # training windows: every trace of a source alike


@dataclass
class Examples:
    """Training windows and their per-horizon targets."""

    windows: F32  # [n, WINDOW, WIDTH]
    step_s: F32  # [n, 1]
    target: F32  # [n, H] ln(mean Mbit/s over h), NaN where unknown
    weight: F64  # [n] sampling weight (each source's weights sum to its weight)
    source: list[str]  # [n]


def examples(
    traces: Sequence[Any],
    horizons: Sequence[float],
    points_per_trace: int = POINTS_PER_TRACE,
    floor_mbps: float = 1e-3,
    synthetic_weight: float = 0.5,
    *,
    trace_balance: bool = False,
) -> Examples:
    """Windows of ``traces`` with the log mean bandwidth over each horizon.

    Every source weighs the same (synthetic profiles ``synthetic_weight``);
    within a source every window, or with ``trace_balance`` every trace
    (as eval-transfer scores: per trace, then per source)."""
    hz = np.asarray(horizons, dtype=np.float64)
    ws, ss, ys, srcs = [], [], [], []
    tids: list[npt.NDArray[np.int64]] = []
    for tr in traces:
        n = len(tr)
        if n < WINDOW + 1:
            continue
        edges, mbit = cumulative(tr)
        ks = np.unique(
            np.linspace(WINDOW - 1, n - 2, min(points_per_trace, n - WINDOW)).astype(np.int64)
        )
        idx = ks[:, None] + np.arange(-WINDOW + 1, 1)[None, :]
        ws.append(tr.data[idx].astype(np.float32))
        ss.append(window_steps(edges[idx]).astype(np.float32))
        mean = mean_over(edges, mbit, ks, hz)
        ys.append(np.log(np.maximum(mean, floor_mbps)).astype(np.float32))
        srcs += [tr.source] * len(ks)
        tids.append(np.full(len(ks), len(tids)))
    windows = np.concatenate(ws)
    source = np.asarray(srcs)
    trace = np.concatenate(tids)
    weight = np.zeros(len(source))
    for s in np.unique(source):
        m = source == s
        w = synthetic_weight if str(s).startswith(SYNTHETIC_PREFIX) else 1.0
        if not trace_balance:
            weight[m] = w / m.sum()
            continue
        ids = np.unique(trace[m])
        for i in ids:
            t = trace == i
            weight[t] = w / len(ids) / t.sum()
    return Examples(windows, np.concatenate(ss)[:, None], np.concatenate(ys), weight, list(srcs))


STEADY_STEPS_S = (0.5, 1.0, 2.0, 5.0)


def steady_traces(seed: int, per_step: int = 6, seconds: float = 1100.0) -> list[Any]:
    """Links that hold their rate (1% noise) for ``seconds`` (past the
    longest horizon), levels 0.1 Mbit/s to 10 Gbit/s, at each of
    :data:`STEADY_STEPS_S`: without them a perfectly steady window
    at a 0.5 s step (only Pantheon's 30 s runs have that step) was read as a
    link about to slow down, by up to 1.5x at 20 s. Source
    ``synthetic_steady``, weighted like the other synthetic profiles."""
    from bwpredd.traces import Trace

    rng = np.random.default_rng([seed, 16])
    out = []
    for step in STEADY_STEPS_S:
        length = int(seconds / step) + WINDOW + 1
        for k in range(per_step):
            level = float(np.exp(rng.uniform(np.log(0.1), np.log(10_000.0))))
            data = np.zeros((length, WIDTH), dtype=np.float32)
            data[:, _BW] = level * np.exp(rng.normal(0.0, 0.01, length))
            data[:, LAT] = 50.0
            data[:, REL] = 1.0
            name = f"synthetic_steady/{step:g}s-{k}"
            out.append(
                Trace(
                    source="synthetic_steady",
                    name=name,
                    group=name,
                    step_s=step,
                    data=data,
                    measured=("bandwidth_mbps",),
                    time_s=np.arange(length, dtype=np.float64) * step,
                )
            )
    return out


def _pinball(model: HorizonNet, w: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ref, mid, low, high = model.log_quantiles(w, s)
    target = y - ref
    mask = torch.isfinite(target)
    target = torch.where(mask, target, torch.zeros_like(target))
    total = torch.zeros(())
    for q, pred in zip(model.cfg.quantiles, (low, mid, high), strict=True):
        diff = target - pred
        total = total + torch.where(mask, torch.maximum(q * diff, (q - 1) * diff), 0.0).sum()
    return total / mask.sum().clamp(min=1)


def _weighted_quantile(values: F64, weights: F64, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w) - 0.5 * w
    return float(np.interp(q * w.sum(), cum, v))


@torch.no_grad()
def calibrate(model: HorizonNet, val: Examples) -> dict[str, Any]:
    """Fit the per-horizon shifts on the validation split's real sources;
    returns what was fitted and the coverage before and after."""
    real = np.array([not s.startswith(SYNTHETIC_PREFIX) for s in val.source])
    w = torch.from_numpy(val.windows[real])
    s = torch.from_numpy(val.step_s[real])
    y = val.target[real].astype(np.float64)
    src = np.asarray(val.source)[real]
    ref, mid, low, high = (t.numpy().astype(np.float64) for t in model.log_quantiles(w, s))
    shift = np.zeros((3, len(model.cfg.horizons)))
    before, after = [], []
    for j in range(len(model.cfg.horizons)):
        ok = np.isfinite(y[:, j])
        if ok.sum() < 50:
            # Too few targets this long: keep the previous horizon's shifts.
            shift[:, j] = shift[:, j - 1] if j else 0.0
            before.append(float("nan"))
            after.append(float("nan"))
            continue
        # Each source weighs the same.
        wt = np.zeros(int(ok.sum()))
        srcs = src[ok]
        for name in np.unique(srcs):
            m = srcs == name
            wt[m] = 1.0 / m.sum()
        yt = y[ok, j] - ref[ok, 0]
        for row, (q, pred) in enumerate(zip(model.cfg.quantiles, (low, mid, high), strict=True)):
            shift[row, j] = _weighted_quantile(yt - pred[ok, j], wt, q)
        inside = (yt >= low[ok, j]) & (yt <= high[ok, j])
        before.append(float((inside * wt).sum() / wt.sum()))
        lo2 = np.minimum(low[ok, j] + shift[0, j], mid[ok, j] + shift[1, j])
        hi2 = np.maximum(high[ok, j] + shift[2, j], mid[ok, j] + shift[1, j])
        inside2 = (yt >= lo2) & (yt <= hi2)
        after.append(float((inside2 * wt).sum() / wt.sum()))
    model.shift.copy_(torch.from_numpy(shift).float())  # type: ignore[operator]
    return {
        "horizons": list(model.cfg.horizons),
        "shift_low": shift[0].tolist(),
        "shift_median": shift[1].tolist(),
        "shift_high": shift[2].tolist(),
        "coverage_before": before,
        "coverage_after": after,
    }


def torch_times(model: HorizonNet) -> Any:
    """``(windows, step_s, payload_bytes) -> (seconds, low, high)`` through the
    torch model and :class:`bwpredd.transfer.HorizonCurves` (what the daemon
    does with the ONNX graph)."""
    from bwpredd.transfer import HorizonCurves

    @torch.no_grad()
    def times(w: F32, step: F64, payload: F64) -> tuple[F64, F64, F64]:
        out = []
        for i in range(0, len(w), 16384):
            m, lo, hi = model(
                torch.from_numpy(np.ascontiguousarray(w[i : i + 16384], np.float32)),
                torch.from_numpy(step[i : i + 16384, None].astype(np.float32)),
            )
            curves = HorizonCurves.from_outputs(
                model.cfg.horizons, m.numpy(), lo.numpy(), hi.numpy()
            )
            out.append(curves.seconds(payload[i : i + 16384]))
        return tuple(np.concatenate([o[k] for o in out]) for k in range(3))  # type: ignore[return-value]

    return times


def today_times(predict: Any) -> Any:
    """Today's rule from a next-step ``window -> (point, low, high)`` predictor."""
    from bwpredd.transfer import next_step_seconds

    def times(w: F32, step: F64, payload: F64) -> tuple[F64, F64, F64]:
        point, low, high = predict(w)
        return next_step_seconds(point, low, high, payload * 8.0 / 1e6)

    return times


def compact(result: dict[str, Any]) -> dict[str, Any]:
    """An eval-transfer result without its per-source tables (for manifests)."""
    return {
        d: {k: v for k, v in entry.items() if k != "per_source"}
        for d, entry in result["durations"].items()
    }


def report_transfer(
    model: HorizonNet,
    test: Sequence[Any],
    today: Any,
    reports: Path,
    *,
    command: str,
    split: str,
) -> dict[str, Any]:
    """Evaluate on the test split with today's rule beside, and write
    ``transfer.md``, ``transfer.json`` and the plot to ``reports``."""
    from trainer.eval_transfer import write_reports

    pts = sample_points(test)
    times = torch_times(model)
    result = evaluate_points(pts, {"model": times, "today": today})
    result["split"] = split
    result["model"] = {"version": "this run (torch)", "horizons": list(model.cfg.horizons)}
    write_reports(result, pts, times, reports, command)
    return result


def _fit(
    tr: Examples,
    va: Examples,
    cfg: TransferTrainConfig,
    model_cfg: HorizonConfig,
    *,
    seed: int,
    progress: bool,
) -> tuple[HorizonNet, dict[str, Any]]:
    """Train one network; keep its best weights on the validation loss."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = HorizonNet(replace(model_cfg, members=1))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    tw, ts, ty = (torch.from_numpy(a) for a in (tr.windows, tr.step_s, tr.target))
    vw, vs, vy = (torch.from_numpy(a) for a in (va.windows, va.step_s, va.target))
    # Validation loss weighs sources alike too: a fixed weighted subsample.
    vidx = torch.from_numpy(
        rng.choice(len(vw), size=min(len(vw), 40_000), p=va.weight / va.weight.sum())
    )
    p = tr.weight / tr.weight.sum()
    best = (float("inf"), 0, {k: v.clone() for k, v in model.state_dict().items()})
    history: list[dict[str, float]] = []
    stale = 0
    for step in range(1, cfg.steps + 1):
        idx = torch.from_numpy(rng.choice(len(tw), size=cfg.batch, p=p))
        model.train()
        loss = _pinball(model, tw[idx], ts[idx], ty[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            with torch.no_grad():
                v = float(_pinball(model, vw[vidx], vs[vidx], vy[vidx]))
            history.append({"step": step, "train": float(loss.detach()), "val": v})
            if progress:
                lt = float(loss.detach())
                print(f"transfer (seed {seed}): step {step} train {lt:.4f} val {v:.4f}")
            if v < best[0] - 1e-5:
                best = (v, step, {k: t.clone() for k, t in model.state_dict().items()})
                stale = 0
            else:
                stale += 1
                if stale >= cfg.patience:
                    break
    model.load_state_dict(best[2])
    model.eval()
    return model, {"seed": seed, "history": history, "best_step": best[1], "best_val_loss": best[0]}


def train_transfer(
    train: Sequence[Any],
    val: Sequence[Any],
    test: Sequence[Any],
    out_dir: Path,
    *,
    cfg: TransferTrainConfig | None = None,
    model_cfg: HorizonConfig | None = None,
    progress: bool = True,
) -> tuple[HorizonNet, dict[str, Any]]:
    """Train ``model_cfg.members`` networks (seeds seed, seed+1, ...), average
    them, calibrate and evaluate; writes ``<out_dir>/horizon.pt``.

    Returns:
        The model and a JSON-able summary (histories, calibration, validation
        and test results under the eval-transfer protocol).
    """
    cfg = cfg or TransferTrainConfig()
    model_cfg = model_cfg or HorizonConfig()
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    kw = {"points_per_trace": cfg.points_per_trace, "synthetic_weight": cfg.synthetic_weight}
    tr = examples(
        [*train, *steady_traces(cfg.seed)],
        model_cfg.horizons,
        trace_balance=cfg.trace_balance,
        **kw,  # type: ignore[arg-type]
    )
    va = examples(val, model_cfg.horizons, **kw)  # type: ignore[arg-type]
    if progress:
        print(f"transfer: {len(tr.windows)} train / {len(va.windows)} val windows")
    fits = [
        _fit(tr, va, cfg, model_cfg, seed=cfg.seed + i, progress=progress)
        for i in range(model_cfg.members)
    ]
    nets = [f[0] for f in fits]
    model = nets[0] if len(nets) == 1 else HorizonNet.merge(nets)
    calib = calibrate(model, va)
    seconds = time.monotonic() - t0
    times = torch_times(model)
    val_res = evaluate_points(sample_points(val), {"model": times})
    test_res = evaluate_points(sample_points(test), {"model": times})
    summary: dict[str, Any] = {
        "train_config": asdict(cfg),
        "model_config": asdict(model_cfg),
        "members": [f[1] for f in fits],
        "train_seconds": seconds,
        "calibration": calib,
        "val": val_res,
        "test": test_res,
        "windows": {"train": len(tr.windows), "val": len(va.windows)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model,
        str(out_dir / "horizon.pt"),
        seed=cfg.seed,
        metrics=json.loads(
            json.dumps({"val": compact(val_res), "test": compact(test_res)}, default=float)
        ),
        calibration=calib,
        train_config=asdict(cfg),
    )
    if progress:
        print(f"transfer: trained in {seconds:.0f} s; validation:")
        print(format_table(val_res))
    return model, summary


def run(args: argparse.Namespace) -> int:
    """The ``train-transfer`` command: load, split as ``train`` does, train,
    then evaluate a model directory with the new graph if one is given."""
    from bwpredd.traces import load_traces
    from trainer.data.synthetic import synthetic_traces
    from trainer.data.windows import split_traces
    from trainer.train import N_SYNTHETIC, SPLIT_FRACTIONS, SYNTHETIC_LENGTH, _split_record

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_traces(Path(args.traces), progress=not args.quiet)
    n_syn, length = (6, 100) if args.quick else (N_SYNTHETIC, SYNTHETIC_LENGTH)
    synthetic = synthetic_traces(args.seed, n_traces=n_syn, length=length)
    train, val, test = split_traces(
        list(loaded.traces) + synthetic, SPLIT_FRACTIONS, seed=args.seed
    )
    if not (out / "split.json").exists():
        rec = _split_record({"train": train, "val": val, "test": test}, args.seed, str(args.traces))
        rec["synthetic"].update(n_traces=n_syn, length=length)
        (out / "split.json").write_text(json.dumps(rec, indent=1) + "\n")
    cfg = TransferTrainConfig(seed=args.seed)
    if args.quick:
        cfg.steps, cfg.eval_every, cfg.points_per_trace = 60, 30, 40
    if args.steps:
        cfg.steps = args.steps
    if args.points:
        cfg.points_per_trace = args.points
    cfg.trace_balance = args.trace_balance
    model_cfg = HorizonConfig(
        hidden=args.hidden,
        layers=args.layers,
        members=args.members,
        level_feature=not args.no_level,
    )
    model, summary = train_transfer(
        train, val, test, out, cfg=cfg, model_cfg=model_cfg, progress=not args.quiet
    )
    (out / "transfer_training.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    today = _today_for(out)
    reports = Path(args.reports) if args.reports else out / "reports"
    result = report_transfer(
        model,
        test,
        today,
        reports,
        command="python -m trainer train-transfer",
        split="the 'test' split",
    )
    print("test split (torch model):")
    print(format_table(result))
    print(f"wrote {reports}/transfer.md")
    return 0


def _today_for(run: Path) -> Any:
    """Today's rule from the run's forecaster.pt, else the embedded default's."""
    from trainer.evaluate import load_predictor

    ckpt = run / "forecaster.pt"
    if ckpt.is_file():
        predict, _ = load_predictor(ckpt)
    else:
        from bwpredd.modeldir import DEFAULT_MODEL_DIR

        predict, _ = load_predictor(DEFAULT_MODEL_DIR)
    return today_times(predict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m trainer train-transfer``."""
    parser.add_argument("--traces", required=True, help="a supported traces directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/latest", help="run directory")
    parser.add_argument("--quick", action="store_true", help="a tiny run of a few seconds")
    parser.add_argument("--reports", help="where transfer.md goes (default: <out>/reports)")
    parser.add_argument("--steps", type=int, default=0, help="override the step cap")
    parser.add_argument("--hidden", type=int, default=HorizonConfig.hidden)
    parser.add_argument("--layers", type=int, default=HorizonConfig.layers)
    parser.add_argument("--members", type=int, default=HorizonConfig.members)
    parser.add_argument("--points", type=int, default=0, help="windows per training trace")
    parser.add_argument("--no-level", action="store_true", help="without the level input")
    parser.add_argument(
        "--trace-balance",
        action="store_true",
        help="weigh a source's training traces alike (not its windows)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)
