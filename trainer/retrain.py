"""``python -m trainer retrain``: learn a mesh's own links from its recordings.

Reads one node's or many nodes' recordings (:func:`bwpredd.traces.load_traces`:
one peer of one node per group, cut into segments at gaps), splits every peer
by time (:func:`trainer.data.windows.split_traces`: the oldest part trains, the
next selects the epoch, the most recent is the test part), and then:

1. rebuilds the base forecaster from its model directory's ONNX graph
   (:mod:`trainer.models.from_onnx`, checked against onnxruntime: a model
   directory carries no PyTorch weights) and fine-tunes it from those
   weights with :func:`trainer.train_forecaster.train_forecaster`, at a
   lower learning rate (:data:`LR`, a fifth of training from scratch) for a
   budget of epochs (never wall time); the epoch with the best validation
   loss is kept, the base itself (epoch 0) included;
2. recalibrates its 80% interval on the validation part;
3. trains the allocator (Double DQN, :func:`trainer.train_agent.train_agent`)
   on the same split with the retrained forecaster in its state;
4. scores the base (its ONNX graph through onnxruntime, as the daemon serves
   it), the retrained forecaster and the baselines on the same test windows,
   per node and macro, and the base and retrained allocators on the test
   part.

It writes a run directory ``python -m export --run DIR`` takes
(``forecaster.pt``, ``allocator.pt``, ``split.json``, ``base/``: the base's
manifest and graphs), ``retrain.json`` (the
figures ``export --gate`` decides on, tied to ``forecaster.pt`` by its
sha256) and ``retrain.md``; the allocator's own reports go to
``DIR/reports``. The base's horizon graph is not retrained: export carries
it over byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from bwpredd.errors import BwpreddError
from bwpredd.safefs import open_trusted_dir
from bwpredd.schema import WINDOW
from bwpredd.traces import RECORDING_SOURCE, Trace, load_traces
from trainer import distributed
from trainer.data.windows import make_windows, split_summary, split_traces, time_cuts
from trainer.evaluate import evaluate_traces, load_predictor
from trainer.report_retrain import GATE_MARGIN, figures, gate, render_markdown

__all__ = ["EPOCHS", "FRACTIONS", "LR", "REPORT_JSON", "add_arguments", "load_recordings", "run"]

# Train / validation / test shares of each peer's time span: a larger test
# part than make train's 15%, because the gate decides on it.
FRACTIONS = (0.6, 0.2, 0.2)
# A fifth of the from-scratch rate (1e-3): the base's weights are the start,
# and a large step on a small mesh's data would forget what they know.
LR = 2e-4
EPOCHS = 20
STEPS_PER_EPOCH = 200
# Fewer batches than from scratch: the EMA must follow the fine-tuning
# within a budget of a few thousand steps (0.999 would average over ~1000).
EMA_DECAY = 0.99
REPORT_JSON = "retrain.json"
REPORT_MD = "retrain.md"


def load_recordings(dirs: list[Path], progress: bool = False) -> list[Trace]:
    """Every recording trace under ``dirs`` (other files are named on stderr).

    Raises:
        FileNotFoundError: a directory does not exist.
        ValueError: two directories hold the same node's recordings.
    """
    out: list[Trace] = []
    where: dict[str, Path] = {}
    for d in dirs:
        loaded = load_traces(d, progress=progress)
        for item in loaded.unknown:
            print(f"not a recording (not used): {item}", file=sys.stderr)
        for tr in loaded.traces:
            if not tr.source.startswith(f"{RECORDING_SOURCE}:"):
                print(f"not a recording (not used): {d}: {tr.name}", file=sys.stderr)
                continue
            seen = where.setdefault(tr.source, d)
            if seen != d:
                raise ValueError(
                    f"--recordings: node {tr.source.split(':', 1)[1]!r} is in both {seen} "
                    f"and {d}: give each node's recordings once"
                )
            out.append(tr)
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this run."""
    parts = ["python", "-m", "trainer", "retrain", "--recordings", *map(str, args.recordings)]
    parts += ["--base", str(args.base), "--out", str(args.out), "--seed", str(args.seed)]
    parts += ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)]
    parts += ["--lr", f"{args.lr:g}", "--ema-decay", f"{args.ema_decay:g}"]
    if args.agent_episodes:
        parts += ["--agent-episodes", str(args.agent_episodes)]
    if args.quick:
        parts.append("--quick")
    return shlex.join(parts)


def _copy_base(base_dir: Path, dest: Path) -> None:
    """Copy the base's manifest and graphs into the run, checked against
    their sha256: the run measures, and ``export`` later reads (for the
    horizon graph and the gate), this copy, whatever happens to the base."""
    from bwpredd.manifest import MANIFEST_NAME, Manifest, verify_files

    if dest.exists() and dest.resolve() == base_dir.resolve():
        return
    raw = (base_dir / MANIFEST_NAME).read_bytes()
    files = verify_files(base_dir, Manifest.from_json(json.loads(raw)))
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name, data in {**files, MANIFEST_NAME: raw}.items():
        (dest / name).write_bytes(data)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_windows(test: list[Trace], n: int, seed: int) -> np.ndarray:
    """Up to ``n`` seeded test windows, to check the rebuilt base on."""
    x = make_windows(test).x
    if len(x) > n:
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]
    return x


def _allocator_rewards(test: list[Trace], base_dir: Path, run_dir: Path) -> dict[str, float] | None:
    """The greedy reward of the base's and the run's allocators on the test
    part, each with its own forecaster, and the one-step oracle's."""
    from trainer.env import prepare_traces
    from trainer.evaluate_allocator import (
        evaluate_policies,
        greedy_policy,
        heuristic_policies,
    )
    from trainer.evaluate_allocator import load_model as load_allocator

    rewards: dict[str, float] = {}
    for name, path in (("base", base_dir), ("retrained", run_dir / "allocator.pt")):
        forecast, q, _ = load_allocator(path)
        prepared = prepare_traces(test, forecast)
        if not prepared:
            return None
        policies = {"greedy": greedy_policy(q), "oracle": heuristic_policies()["oracle"]}
        res = evaluate_policies(prepared, policies)
        rewards[f"{name}_reward"] = float(res["greedy"]["macro"]["reward"])
        rewards["oracle_reward"] = float(res["oracle"]["macro"]["reward"])
    return rewards


def run(args: argparse.Namespace) -> int:
    """The ``retrain`` command: one process, or every rank under torchrun
    (the fine-tuning data-parallel; rank 0 alone evaluates, trains the
    allocator and writes the run)."""
    distributed.setup()
    try:
        return _run(args)
    finally:
        distributed.shutdown(wait=False)  # an error path; the normal one closed it


def _run(args: argparse.Namespace) -> int:
    import torch

    from trainer.dqn import QUICK, AgentConfig
    from trainer.models.forecaster import save_checkpoint
    from trainer.models.from_onnx import RecoveryError, load_forecaster
    from trainer.predict import forecast_fn
    from trainer.train_agent import train_agent
    from trainer.train_forecaster import TrainConfig, calibrate_interval, train_forecaster

    t0 = time.monotonic()
    rules = (
        ("--epochs", args.epochs >= 0, ">= 0"),
        ("--steps-per-epoch", args.steps_per_epoch >= 1, ">= 1"),
        ("--patience", args.patience >= 1, ">= 1"),
        ("--lr", args.lr > 0, "> 0"),
        ("--ema-decay", 0 <= args.ema_decay < 1, "in [0, 1)"),
        ("--threads", args.threads >= 1, ">= 1"),
    )
    for flag, ok, rule in rules:
        if not ok:
            print(
                f"retrain: {flag}: must be {rule}, got {getattr(args, flag[2:].replace('-', '_'))}",
                file=sys.stderr,
            )
            return 2
    torch.set_num_threads(args.threads)
    dirs = [Path(d) for d in args.recordings]
    try:
        traces = load_recordings(dirs, progress=not args.quiet)
    except (FileNotFoundError, ValueError) as exc:
        print(f"retrain: {exc}", file=sys.stderr)
        return 2
    if not traces:
        print(f"retrain: no usable recordings under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2
    cuts = time_cuts(traces, FRACTIONS)
    train, val, test = split_traces(traces, FRACTIONS, seed=args.seed, cuts=cuts)
    for name, part in (("train", train), ("validation", val), ("test", test)):
        if not part:
            print(
                f"retrain: the recordings give no {name} windows: a peer's part of its time "
                f"span ({FRACTIONS[0]:.0%} / {FRACTIONS[1]:.0%} / {FRACTIONS[2]:.0%}) needs "
                f"more than {WINDOW} samples; record longer",
                file=sys.stderr,
            )
            return 2
    nodes = sorted({t.source for t in traces})
    print(
        f"{len(traces)} traces of {len({t.group for t in traces})} peers on {len(nodes)} nodes "
        f"-> {len(train)} train / {len(val)} val / {len(test)} test pieces"
    )
    main = distributed.is_main()
    out = Path(args.out)
    if main:
        # The run is written by path, by many hands (torch.save, reports):
        # refuse a directory another user could plant a link in, or swap
        # a directory of, anywhere on the way (root may run this).
        try:
            os.close(open_trusted_dir(out, whole_path=True))
        except OSError as exc:
            print(
                f"retrain: --out {out}: {exc.filename}: {exc.strerror}; write the run where "
                "no other user may write (nor in any directory above it)",
                file=sys.stderr,
            )
            return 2
        (out / REPORT_JSON).unlink(missing_ok=True)  # an earlier run's figures are not gated
    split_rec = {
        "seed": args.seed,
        "traces_dir": str(dirs[0]),
        "recordings": [str(d) for d in dirs],
        "fractions": list(FRACTIONS),
        "splits": {
            name: [{"source": t.source, "name": t.name, "group": t.group} for t in part]
            for name, part in (("train", train), ("val", val), ("test", test))
        },
        "time_cuts": {g: list(c) for g, c in cuts.items()},
    }
    base_dir, base_copy = Path(args.base), out / "base"
    if main:
        (out / "split.json").write_text(json.dumps(split_rec, indent=1) + "\n")
        try:
            _copy_base(base_dir, base_copy)
        except (BwpreddError, OSError, ValueError) as exc:
            print(f"retrain: --base {base_dir}: {exc}", file=sys.stderr)
            return 2
    distributed.barrier()  # every rank starts from rank 0's copy of the base
    try:
        base = load_forecaster(base_copy, _check_windows(test, 512, args.seed), seed=args.seed)
    except (BwpreddError, RecoveryError, OSError, ValueError) as exc:
        print(f"retrain: --base {base_dir}: {exc}", file=sys.stderr)
        return 2
    print(
        f"base {base.version}: weights rebuilt from its ONNX graph, max rel err "
        f"{base.parity['max_rel_err']:.1e} against onnxruntime on {base.parity['windows']}"
    )
    cfg = TrainConfig(
        seed=args.seed,
        lr=args.lr,
        min_lr=args.lr / 8,
        max_epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        patience=args.patience,
        ema_decay=args.ema_decay,
        threads=args.threads,
    )
    model, hist = train_forecaster(train, val, cfg, progress=not args.quiet, init_from=base.model)
    dist_info = distributed.finish(model, "retrain.json")
    if not main:
        return 0
    print(f"forecaster: {hist.stopped}; best epoch {hist.best_epoch}, {hist.seconds:.0f} s")
    scale = calibrate_interval(model, val)
    print(f"interval scale calibrated on the validation part: {scale:.3f}")

    base_predict, _ = load_predictor(base_copy)
    base_res = evaluate_traces(test, base_predict)
    new_res = evaluate_traces(test, forecast_fn(model))
    test_figures = figures(base_res, new_res)
    ckpt = out / "forecaster.pt"
    base_info = {
        "model_dir": str(base_dir),
        "version": base.version,
        "forecaster_sha256": base.forecaster_sha256,
        "parity": base.parity,
    }
    training_data = {
        "recordings": [str(d) for d in dirs],
        "split": split_summary(train, val, test),
        "fractions": list(FRACTIONS),
    }
    save_checkpoint(
        model,
        str(ckpt),
        seed=args.seed,
        metrics=json.loads(json.dumps({"test": test_figures}, default=float)),
        training_data=json.loads(json.dumps(training_data, default=float)),
        train_config=json.loads(json.dumps(asdict(cfg), default=float)),
        history=json.loads(json.dumps(hist.to_json(), default=float)),
        feature_defaults=base.feature_defaults,
        base=base_info,
    )
    print(f"wrote {ckpt}")

    agent_cfg = QUICK if args.quick else AgentConfig()
    if args.agent_episodes:
        agent_cfg = replace(agent_cfg, episodes=args.agent_episodes)
    agent = train_agent(
        train,
        val,
        test,
        ckpt,
        out,
        args.seed,
        quick=args.quick,
        reports_dir=out / "reports",
        config=agent_cfg,
        progress=not args.quiet,
    )
    torch.set_num_threads(args.threads)  # train_agent sets its own
    report: dict[str, Any] = {
        "kind": "retrain",
        "command": _command(args),
        "distributed": dist_info,
        "recordings": [str(d) for d in dirs],
        "base": base_info,
        "retrained": {"checkpoint": ckpt.name, "checkpoint_sha256": _sha256(ckpt)},
        "split": {
            "fractions": list(FRACTIONS),
            "nodes": len(nodes),
            "peers": len({t.group for t in traces}),
            "per_node": split_summary(train, val, test),
        },
        "training": {
            **{k: v for k, v in asdict(cfg).items() if k != "source_weights"},
            "best_epoch": hist.best_epoch,
            "steps": hist.steps,
            "seconds": hist.seconds,
            "stopped": hist.stopped,
            "initial_val_loss": hist.initial_val_loss,
            "best_val_loss": hist.best_val_loss,
            "interval_scale": scale,
        },
        "test": test_figures,
        "allocator": {
            "episodes": agent_cfg.episodes,
            "train_seconds": agent.get("train_seconds"),
            **(_allocator_rewards(test, base_copy, out) or {}),
        },
    }
    verdict = gate(report)
    report["gate"] = {"margin": GATE_MARGIN, "passes": verdict.passed, "message": verdict.message}
    report["seconds"] = time.monotonic() - t0
    safe = json.loads(json.dumps(report, default=float))
    (out / REPORT_JSON).write_text(json.dumps(safe, indent=2, sort_keys=True) + "\n")
    (out / REPORT_MD).write_text(render_markdown(safe))
    print(f"wrote {out / REPORT_JSON}, {out / REPORT_MD}")
    print(f"gate: {'passes' if verdict.passed else 'fails'}: {verdict.message}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m trainer retrain``."""
    parser.add_argument(
        "--recordings",
        nargs="+",
        required=True,
        metavar="DIR",
        help="recordings directories: a node's <state_dir>/recordings, or a directory "
        "holding several nodes' side by side",
    )
    parser.add_argument(
        "--base", required=True, metavar="MODEL_DIR", help="the model directory to start from"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--epochs", type=int, default=EPOCHS, help="epoch budget of the fine-tuning"
    )
    parser.add_argument("--steps-per-epoch", type=int, default=STEPS_PER_EPOCH)
    parser.add_argument("--patience", type=int, default=5, help="epochs without improvement")
    parser.add_argument("--lr", type=float, default=LR, help="the fine-tuning learning rate")
    parser.add_argument("--ema-decay", type=float, default=EMA_DECAY)
    parser.add_argument(
        "--agent-episodes", type=int, help="the allocator's training episodes (default: its own)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a tiny allocator run (tests, a first look); the forecaster keeps --epochs",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
