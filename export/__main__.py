"""``python -m export``: a training run's checkpoints -> a published model directory.

The run's ``horizon.pt`` (the transfer-time model), when present, ships as a
third graph; a ``trainer retrain`` run has none and ships its base's horizon
graph byte for byte (``<run>/base``). ``--add-horizon-to DIR`` instead adds
the run's horizon graph to an already published directory, keeping its other
graphs byte for byte (how the embedded default got its horizons without
retraining the rest).

``--gate`` (retrain runs only) publishes only a forecaster that earned it on
the recordings' test part: ``retrain.json``'s figures, tied to
``forecaster.pt`` by its sha256, must pass
:func:`trainer.report_retrain.gate` (macro normalised MAE at most 0.98x the
base's and at most the best baseline's), and ``--out``, when it exists, must
serve the forecaster the run was compared against. Otherwise nothing is
written, ``--out`` is left as it is and the exit code is
:data:`EXIT_REFUSED`, with a message naming the figures. A gated publish
replaces ``--out`` (that is what it is for); the daemon serving it picks the
new model up on its next reload (SIGHUP, ``systemctl reload bwpredd``).

``--slim DIR`` republishes an already published directory with the graphs
this exporter writes now (:func:`export.slim.slim_model_dir`), in place or
to ``--out``; ``--members K[,K...]`` with it keeps only those of the
forecaster's members, to measure what the others buy (``trainer eval`` on
the result) and what they cost (``python -m bench.after_sample --model``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bwpredd.errors import BwpreddError
from bwpredd.manifest import load_manifest
from bwpredd.state import STATE_LAYOUT
from export import DEFAULT_MODEL_DIR, ExportError, copy_model_dir, export_model_dir
from export.horizon import add_horizon
from export.manifest import default_version, weights_digest
from export.slim import slim_model_dir
from export.verify import ParityError, parity_windows
from trainer.models.forecaster import load_checkpoint as load_forecaster
from trainer.models.from_onnx import RecoveryError
from trainer.models.horizon import load_checkpoint as load_horizon
from trainer.models.qnet import QNetConfig, QNetwork
from trainer.models.qnet import load_checkpoint as load_qnet
from trainer.report_retrain import gate
from trainer.retrain import REPORT_JSON

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3  # --gate: the run's forecaster did not earn the publish


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, export, verify and publish.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export forecaster.pt and allocator.pt of a run to a verified model directory.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run", type=Path, help="run dir with the .pt checkpoints (required unless --slim)"
    )
    parser.add_argument("--out", type=Path, help="model dir to publish (default models/<version>)")
    parser.add_argument("--embed", action="store_true", help="also refresh bwpredd/models/default")
    parser.add_argument("--traces", type=Path, help="traces dir for parity windows")
    parser.add_argument("--version", help="model version (default: UTC date + weights hash)")
    parser.add_argument("--int8", action="store_true", help="try int8 graphs, keep the winners")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument(
        "--untrained-allocator",
        action="store_true",
        help="bootstrap only: export a seeded, untrained Q-network if allocator.pt is missing",
    )
    parser.add_argument("--exporter", choices=("legacy", "dynamo"), default="legacy")
    parser.add_argument("--seed", type=int, default=0, help="seed for parity windows and init")
    parser.add_argument("--parity-windows", type=int, default=2048, help="windows to compare on")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="publish a retrain run only if it beats its base and the baselines (see above)",
    )
    parser.add_argument(
        "--add-horizon-to",
        type=Path,
        metavar="DIR",
        help="add the run's horizon.pt to the published model directory DIR (see above)",
    )
    parser.add_argument(
        "--slim",
        type=Path,
        metavar="DIR",
        help="republish the model directory DIR with its graphs slimmed (see above)",
    )
    parser.add_argument(
        "--members",
        type=_indices,
        metavar="K[,K...]",
        help="with --slim: keep only these of the forecaster's members (0-based)",
    )
    args = parser.parse_args(argv)
    if args.members is not None and args.slim is None:
        parser.error("--members goes with --slim DIR")
    if args.slim is not None:
        return _slim(args)
    if args.run is None:
        parser.error("--run is required (or --slim DIR)")
    if args.gate and args.add_horizon_to is not None:
        parser.error("--gate publishes a retrain run; it does not combine with --add-horizon-to")
    if args.add_horizon_to is not None:
        return _add_horizon(args)

    t0 = time.perf_counter()
    if args.gate:
        code = _gate(args.run, args.out)
        if code != EXIT_OK:
            return code
        args.force = True
        if args.traces is None:  # check parity on the recordings the run learned from
            recorded = json.loads((args.run / REPORT_JSON).read_text()).get("recordings", [])
            args.traces = next((Path(d) for d in recorded if Path(d).exists()), None)
    try:
        forecaster, f_ckpt, allocator, a_ckpt = _load_run(
            args.run, untrained_allocator=args.untrained_allocator, seed=args.seed
        )
    except (FileNotFoundError, ExportError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    version = args.version or default_version(weights_digest(forecaster, allocator))
    out = args.out or Path("models") / version
    windows, source = parity_windows(args.traces, args.parity_windows, args.seed)
    try:
        result = export_model_dir(
            forecaster,
            allocator,
            out,
            windows=windows,
            windows_source=source,
            version=version,
            state_layout=tuple(a_ckpt.get("state_layout") or STATE_LAYOUT),
            feature_defaults=f_ckpt.get("feature_defaults"),
            evaluation={
                "forecaster": f_ckpt.get("metrics", {}),
                "allocator": a_ckpt.get("metrics", {}),
            },
            training_data={
                "forecaster": f_ckpt.get("training_data", {}),
                "allocator": a_ckpt.get("training_data", {}),
            },
            provenance=_provenance(args.run, f_ckpt, a_ckpt),
            exporter=args.exporter,
            int8=args.int8,
            force=args.force,
            horizon=_load_horizon(args.run),
            keep_horizon_from=args.run / "base" if (args.run / "base").is_dir() else None,
        )
        if args.embed:
            copy_model_dir(result.path, DEFAULT_MODEL_DIR)
    except (ExportError, ParityError, BwpreddError) as exc:
        print(f"export: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"export: OK {result.path} version {version}; parity max rel err forecaster "
        f"{result.forecaster_parity.max_rel_err:.2e} allocator "
        f"{result.allocator_parity.max_rel_err:.2e}; {time.perf_counter() - t0:.1f}s"
    )
    return EXIT_OK


def _gate(run: Path, out: Path | None) -> int:
    """Decide ``--gate``; print the verdict with its figures."""
    path = run / REPORT_JSON
    try:
        report = json.loads(path.read_text())
        ckpt_sha = hashlib.sha256((run / "forecaster.pt").read_bytes()).hexdigest()
    except FileNotFoundError as exc:
        print(f"export: --gate: {exc.filename}: missing (a trainer retrain run)", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        print(f"export: --gate: {path}: unreadable: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if report.get("retrained", {}).get("checkpoint_sha256") != ckpt_sha:
        print(
            f"export: gate REFUSED: {run}/forecaster.pt is not the checkpoint {path.name} "
            f"measured (sha256 {ckpt_sha[:12]}...): retrain again",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    verdict = gate(report)
    kept = f"{out} left as it is" if out is not None else "nothing published"
    if not verdict.passed:
        print(f"export: gate REFUSED: {verdict.message}; {kept}", file=sys.stderr)
        return EXIT_REFUSED
    base = report["base"]
    if out is not None and out.exists():
        try:
            serving = load_manifest(out)
        except BwpreddError as exc:
            print(
                f"export: gate REFUSED: {out} exists and is not a model directory that loads "
                f"({exc}): cannot tell what it serves; {kept}",
                file=sys.stderr,
            )
            return EXIT_REFUSED
        if serving.forecaster.sha256 != base["forecaster_sha256"]:
            print(
                f"export: gate REFUSED: {out} serves version {serving.version} (forecaster "
                f"sha256 {serving.forecaster.sha256[:12]}...), but the run was compared against "
                f"{base['model_dir']} version {base['version']} (forecaster sha256 "
                f"{base['forecaster_sha256'][:12]}...): retrain with --base {out}; {kept}",
                file=sys.stderr,
            )
            return EXIT_REFUSED
    print(f"export: gate passed: {verdict.message}")
    return EXIT_OK


def _load_horizon(run: Path) -> torch.nn.Module | None:
    path = run / "horizon.pt"
    if not path.is_file():
        if (run / "base").is_dir():
            return None  # a retrain run: the base's horizon graph is kept
        print(f"export: {path} missing; the directory serves the next step only (no horizons)")
        return None
    model, _ = load_horizon(str(path))
    return model


def _indices(text: str) -> list[int]:
    """``--members``: comma-separated member indices."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None


def _slim(args: argparse.Namespace) -> int:
    src = args.slim
    windows, source = parity_windows(args.traces, args.parity_windows, args.seed)
    try:
        manifest = slim_model_dir(
            src,
            args.out or src,
            windows=windows,
            windows_source=source,
            version=args.version,
            force=args.force or args.out is None,
            members=args.members,
        )
        if args.embed:
            copy_model_dir(args.out or src, DEFAULT_MODEL_DIR)
    except (ExportError, ParityError, BwpreddError, RecoveryError) as exc:
        print(f"export: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"export: OK {args.out or src} version {manifest.version}")
    return EXIT_OK


def _add_horizon(args: argparse.Namespace) -> int:
    path = args.run / "horizon.pt"
    if not path.is_file():
        print(f"export: {path}: missing (python -m trainer train-transfer)", file=sys.stderr)
        return EXIT_USAGE
    model, ckpt = load_horizon(str(path))
    src = args.add_horizon_to
    windows, source = parity_windows(args.traces, args.parity_windows, args.seed)
    try:
        manifest = add_horizon(
            src,
            model,
            args.out or src,
            windows=windows,
            windows_source=source,
            evaluation=dict(ckpt.get("metrics", {})),
            provenance={
                "run": str(args.run),
                "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "seed": ckpt.get("seed"),
            },
            version=args.version,
            force=args.force or args.out is None,
        )
        if args.embed:
            copy_model_dir(args.out or src, DEFAULT_MODEL_DIR)
    except (ExportError, ParityError, BwpreddError) as exc:
        print(f"export: FAILED: {exc}", file=sys.stderr)
        return EXIT_FAILED
    hz = list(manifest.horizons)
    print(f"export: OK {args.out or src} version {manifest.version} horizons {hz}")
    return EXIT_OK


def _load_run(
    run: Path, *, untrained_allocator: bool, seed: int
) -> tuple[torch.nn.Module, dict[str, Any], torch.nn.Module, dict[str, Any]]:
    f_path, a_path = run / "forecaster.pt", run / "allocator.pt"
    if not f_path.is_file():
        raise FileNotFoundError(f"{f_path}: missing (train first: python -m trainer train)")
    forecaster, f_ckpt = load_forecaster(str(f_path))
    if a_path.is_file():
        allocator, a_ckpt = load_qnet(str(a_path))
        raw_layout: Any = a_ckpt.get("state_layout") or ()
        layout = tuple(str(name) for name in raw_layout)
        if layout and layout != STATE_LAYOUT:
            raise ExportError(
                f"{a_path}: trained on state layout {list(layout)}, "
                f"but bwpredd builds {list(STATE_LAYOUT)}"
            )
    elif untrained_allocator:
        print(f"export: WARNING {a_path} missing; exporting an UNTRAINED seeded Q-network")
        torch.manual_seed(seed)
        allocator = QNetwork(QNetConfig(state_size=len(STATE_LAYOUT)))
        allocator.eval()
        a_ckpt = {
            "kind": "qnet",
            "state_layout": list(STATE_LAYOUT),
            "metrics": {"note": f"untrained Q-network (seed {seed}); bootstrap only"},
            "seed": seed,
        }
    else:
        raise ExportError(
            f"{a_path}: missing (train the agent, or pass --untrained-allocator to bootstrap)"
        )
    return forecaster, dict(f_ckpt), allocator, dict(a_ckpt)


def _provenance(run: Path, f_ckpt: dict[str, Any], a_ckpt: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"run": str(run)}
    for name, ckpt in (("forecaster", f_ckpt), ("allocator", a_ckpt)):
        path = run / f"{name}.pt"
        out[name] = {
            "checkpoint_sha256": hashlib.sha256(path.read_bytes()).hexdigest()
            if path.is_file()
            else None,
            "seed": ckpt.get("seed"),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
