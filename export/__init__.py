"""From torch models to a verified, atomically published model directory.

:func:`export_model_dir` runs the whole flow: export both graphs
(:mod:`export.to_onnx`), check them against torch in onnxruntime
(:mod:`export.verify`), optionally try int8 (:mod:`export.quantize`), write
the manifest (:mod:`export.manifest`), re-check the finished directory the way
the daemon will (:func:`bwpredd.checkmodel.check_model_dir`), and only then
publish it with a rename. ``python -m export`` is the command-line face.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from bwpredd.manifest import MANIFEST_NAME, Manifest, manifest_text
from bwpredd.modeldir import DEFAULT_MODEL_DIR, session
from bwpredd.safefs import UnsafePath, open_new, open_trusted_dir
from bwpredd.schema import DEFAULTS
from bwpredd.state import STATE_LAYOUT
from export.manifest import build_manifest, default_version, weights_digest
from export.slim import slim_allocator, slim_forecaster
from export.to_onnx import (
    Exporter,
    export_allocator,
    export_forecaster,
    graph_opset,
    op_counts,
)
from export.verify import (
    F32,
    ParityReport,
    allocator_parity,
    forecaster_parity,
    time_session,
    torch_forecast,
)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ExportError",
    "ExportResult",
    "export_model_dir",
    "publish_dir",
    "publish_new_dir",
]

FORECASTER_FILE = "forecaster.onnx"
ALLOCATOR_FILE = "allocator.onnx"
_RENAME_EXCHANGE = 2


class ExportError(RuntimeError):
    """The export cannot produce a directory that passes its checks."""


@dataclass
class ExportResult:
    """A published model directory and what was measured on the way."""

    path: Path
    manifest: Manifest
    forecaster_parity: ParityReport
    allocator_parity: ParityReport
    sizes: dict[str, int]
    timings_ms: dict[str, float]
    int8: dict[str, Any] = field(default_factory=dict)
    horizon_parity: ParityReport | None = None


def export_model_dir(
    forecaster: nn.Module,
    allocator: nn.Module,
    dest: Path,
    *,
    windows: F32,
    windows_source: str,
    version: str | None = None,
    state_layout: tuple[str, ...] = STATE_LAYOUT,
    feature_defaults: Mapping[str, float] | None = None,
    interval: Mapping[str, float] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    training_data: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    exporter: Exporter = "legacy",
    int8: bool = False,
    force: bool = False,
    timing: bool = True,
    log: Callable[[str], None] = print,
    horizon: nn.Module | None = None,
    keep_horizon_from: Path | None = None,
) -> ExportResult:
    """Export, verify, describe and publish a model directory at ``dest``.

    Args:
        forecaster: maps ``[N, WINDOW, WIDTH]`` raw windows to (point, low, high)
            ``[N, 1]`` in Mbit/s.
        allocator: maps ``[N, S]`` states to ``[N, 10]`` Q-values.
        dest: the directory to publish (its parent is created if needed).
        windows: raw windows for the parity check (seeded, real if possible).
        windows_source: where ``windows`` came from (recorded).
        version: the model version; default: UTC date + weights hash.
        state_layout: the allocator state's columns (S = its length).
        feature_defaults: declared defaults; default the schema's (``bwpredd.schema.DEFAULTS``).
        interval: ``low_quantile``/``high_quantile``; default the forecaster's.
        evaluation: metrics carried in the checkpoints.
        training_data: training data summaries carried in the checkpoints.
        provenance: where the weights came from (run dir, checkpoints' sha256).
        exporter: ``"legacy"`` or ``"dynamo"`` (see :mod:`export.to_onnx`).
        int8: also try int8 graphs and keep those that win.
        force: replace an existing ``dest`` (the old one is renamed aside,
            then deleted once the new one is in place).
        timing: measure batch-1 and batch-1000 latency (off for fast tests).
        log: where progress lines go.
        horizon: a horizon model (:mod:`export.horizon`): shipped as a third
            graph with its horizons declared; None: a next-step-only directory.
        keep_horizon_from: when ``horizon`` is None, a published model
            directory whose horizon graph (if it has one) is shipped byte for
            byte, with its horizons, parity and evaluation (a retrain run
            fine-tunes the forecaster, not the horizon model).

    Raises:
        ExportError: ``dest`` exists without ``force``, or a check failed.
        export.verify.ParityError: onnxruntime disagrees with torch.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise ExportError(f"{dest}: exists (pass --force to replace it)")
    if feature_defaults is None:
        feature_defaults = DEFAULTS
    if interval is None:
        cfg = getattr(forecaster, "cfg", None)
        interval = {
            "low_quantile": float(getattr(cfg, "low_quantile", 0.1)),
            "high_quantile": float(getattr(cfg, "high_quantile", 0.9)),
        }
    forecaster.eval()
    allocator.eval()
    version = version or default_version(weights_digest(forecaster, allocator))

    t0 = time.perf_counter()
    log(f"export: forecaster -> ONNX ({exporter} exporter)")
    f_bytes, slim = slim_forecaster(export_forecaster(forecaster, exporter=exporter))
    log(
        f"export: forecaster graph slimmed from {slim.nodes_before} to {slim.nodes_after} nodes"
        f" ({slim.norms_folded_into_lstm + slim.norms_folded_into_gemm} norms folded,"
        f" {slim.zero_states_dropped} zero states dropped)"
        + (f"; left: {'; '.join(slim.skipped)}" if slim.skipped else "")
    )
    log(f"export: allocator -> ONNX (state size {len(state_layout)})")
    a_bytes, a_slim = slim_allocator(
        export_allocator(allocator, len(state_layout), exporter=exporter)
    )
    log(
        f"export: allocator graph slimmed from {a_slim.nodes_before} to {a_slim.nodes_after}"
        f" nodes ({a_slim.norms_folded_into_gemm} affine steps folded into Gemms)"
    )
    opset = graph_opset(f_bytes)
    if graph_opset(a_bytes) != opset:
        raise ExportError(f"opsets differ: {opset} vs {graph_opset(a_bytes)}")
    log(f"export: both graphs (opset {opset}) pass onnx.checker ({time.perf_counter() - t0:.1f}s)")

    log(f"verify: parity on {len(windows)} windows ({windows_source})")
    forecasts = torch_forecast(forecaster, windows)
    f_par = forecaster_parity(forecaster, f_bytes, windows, forecasts)
    a_par, states = allocator_parity(allocator, a_bytes, windows, forecasts)
    log(
        f"verify: forecaster max rel err {f_par.max_rel_err:.2e}, allocator max rel err "
        f"{a_par.max_rel_err:.2e}, greedy actions agree {a_par.action_agreement:.2%}"
    )

    timings: dict[str, float] = {}
    if timing:
        timings = _timings(f_bytes, a_bytes, windows, states)
        log("verify: latency (1 thread, ORT_ENABLE_ALL) " + _fmt_timings(timings))

    int8_report: dict[str, Any] = {}
    if int8:
        from export.quantize import try_int8

        f_bytes, a_bytes, int8_report = try_int8(f_bytes, a_bytes, windows, states, log=log)

    files = {FORECASTER_FILE: f_bytes, ALLOCATOR_FILE: a_bytes}
    h_par = None
    if horizon is not None:
        from export.horizon import HORIZON_FILE, export_horizon, horizon_parity

        h_bytes = export_horizon(horizon)
        h_par = horizon_parity(horizon, h_bytes, windows)
        log(f"verify: horizon max rel err {h_par.max_rel_err:.2e}")
        files[HORIZON_FILE] = h_bytes
    kept = (
        _kept_horizon(keep_horizon_from)
        if horizon is None and keep_horizon_from is not None
        else None
    )
    if kept is not None:
        from export.horizon import HORIZON_FILE

        files[HORIZON_FILE] = kept["bytes"]
        log(f"export: horizon graph kept byte for byte from {keep_horizon_from}")
    sizes = {name: len(data) for name, data in files.items()}
    extra: dict[str, Any] = {
        "parity": {
            "tolerance": 1e-4,
            "max_rel_err": max(f_par.max_rel_err, a_par.max_rel_err),
            "inputs": windows_source,
            "forecaster": f_par.to_json(),
            "allocator": a_par.to_json(),
        },
        "export": {
            "exporter": "torch.onnx legacy TorchScript (dynamo=False)"
            if exporter == "legacy"
            else "torch.onnx dynamo",
            "op_counts": {name: op_counts(data) for name, data in files.items()},
            "slim": {FORECASTER_FILE: asdict(slim), ALLOCATOR_FILE: asdict(a_slim)},
            "sizes_bytes": sizes,
            "timings_ms": timings,
            "provenance": dict(provenance or {}),
        },
    }
    if int8_report:
        extra["int8"] = int8_report
    if horizon is not None and h_par is not None:
        from export.horizon import HORIZON_FILE, horizon_manifest_entry

        extra["parity"]["horizon"] = h_par.to_json()
        horizons = tuple(float(h) for h in getattr(horizon, "cfg").horizons)  # noqa: B009
        extra.update(horizon_manifest_entry(files[HORIZON_FILE], horizons))

    if kept is not None:
        from export.horizon import HORIZON_FILE, horizon_manifest_entry

        extra.update(horizon_manifest_entry(files[HORIZON_FILE], kept["horizons"]))
        extra["parity"]["horizon"] = kept["parity"]
        extra["export"]["provenance"]["horizon"] = kept["provenance"]
        extra["export"]["op_counts"][HORIZON_FILE] = kept["op_counts"]
        evaluation = {**(evaluation or {}), "horizon": kept["evaluation"]}

    manifest = build_manifest(
        version=version,
        forecaster_file=FORECASTER_FILE,
        forecaster_sha256=hashlib.sha256(f_bytes).hexdigest(),
        forecaster_session=session(f_bytes),
        allocator_file=ALLOCATOR_FILE,
        allocator_sha256=hashlib.sha256(a_bytes).hexdigest(),
        allocator_session=session(a_bytes),
        state_layout=tuple(state_layout),
        feature_defaults=feature_defaults,
        interval=interval,
        opset=opset,
        versions=_versions(),
        evaluation=evaluation or {},
        training_data=training_data or {},
        extra=extra,
    )
    publish_new_dir(dest, files, manifest, force=force)
    log(f"export: published {dest} (version {version}, {_fmt_sizes(sizes)})")
    return ExportResult(dest, manifest, f_par, a_par, sizes, timings, int8_report, h_par)


def _kept_horizon(model_dir: Path) -> dict[str, Any] | None:
    """The horizon graph of a published directory and what its manifest
    says of it, or None when it declares no horizons.

    Raises:
        bwpredd.errors.BwpreddError: the directory's manifest or files fail
            their checks.
    """
    from bwpredd.manifest import load_manifest, verify_files

    old = load_manifest(model_dir)
    if old.horizon is None:
        return None
    data = verify_files(model_dir, old)[old.horizon.file]
    raw = old.to_json()
    provenance = raw.get("export", {}).get("provenance", {})
    return {
        "bytes": data,
        "horizons": old.horizons,
        "parity": raw.get("parity", {}).get("horizon", {}),
        "evaluation": old.evaluation.get("horizon", {}),
        "op_counts": raw.get("export", {}).get("op_counts", {}).get(old.horizon.file, {}),
        "provenance": {
            "kept_from": str(model_dir),
            "version": old.version,
            "sha256": old.horizon.sha256,
            "origin": provenance.get("horizon", {}),
        },
    }


def publish_new_dir(
    dest: Path, files: Mapping[str, bytes], manifest: Manifest, *, force: bool
) -> None:
    """Build a model directory beside ``dest`` and publish it there: write
    ``files`` and ``manifest`` into a fresh sibling, fsync them and the
    directory, check it as the daemon would, then swap it into place
    (:func:`publish_dir`). On any failure the sibling is removed and
    ``dest`` is left as it was.

    Raises:
        ExportError: ``dest`` exists without ``force``, its parent is one
            another user could write or is reached through a link another
            user owns (:func:`bwpredd.safefs.open_trusted_dir`), or the built
            directory fails the daemon's checks.
    """
    _build_and_publish(dest, {**files, MANIFEST_NAME: manifest_text(manifest).encode()}, force)


def publish_dir(src: Path, dest: Path, *, force: bool = False) -> None:
    """Move a finished directory into place atomically.

    A new ``dest`` appears with one ``rename``. An existing one (only with
    ``force``) is swapped with ``renameat2(RENAME_EXCHANGE)`` where the kernel
    offers it, so ``dest`` never goes missing; elsewhere the old one is renamed
    aside and the new one renamed in. The old directory is then deleted.

    Args:
        src: the finished directory, a sibling of ``dest`` (same filesystem).
        dest: where it goes.
        force: replace an existing ``dest``.

    Raises:
        ExportError: ``dest`` exists and ``force`` is false, or its parent is
            refused as in :func:`publish_new_dir`.
    """
    with _parent(dest) as parent:
        _publish(parent, src.name, dest, force=force)


def copy_model_dir(src: Path, dest: Path, *, log: Callable[[str], None] = print) -> None:
    """Publish a copy of a model directory at ``dest`` (used to refresh the
    embedded default): copy aside, fsync, check, swap in, delete the old one.

    Args:
        src: a published model directory.
        dest: e.g. ``bwpredd/models/default``.
        log: where progress lines go.

    Raises:
        ExportError: as :func:`publish_new_dir`.
    """
    files = {item.name: item.read_bytes() for item in sorted(src.iterdir()) if item.is_file()}
    _build_and_publish(dest, files, force=True)
    log(f"export: refreshed {dest}")


@contextlib.contextmanager
def _parent(dest: Path) -> Iterator[int]:
    """The directory ``dest`` goes in (created if missing), opened so that
    nothing another user placed on the way is followed; refused if anyone
    but this user may write it. Root may publish under the service's own
    ``/var/lib/bwpredd``: every name is then used relative to this
    descriptor, never through the path again."""
    try:
        fd = open_trusted_dir(dest.parent)
    except UnsafePath as exc:
        raise ExportError(
            f"{exc.filename}: {exc.strerror}: another user could redirect or replace what "
            "export writes there; publish into a directory only this user may write"
        ) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _build_and_publish(dest: Path, files: Mapping[str, bytes], force: bool) -> None:
    """Write ``files`` into a fresh hidden sibling of ``dest``, fsync, check
    it as the daemon would and publish it (:func:`_publish`); on any
    failure remove the sibling."""
    with _parent(dest) as parent:
        tmp = _tmp_name(dest, "building")
        os.mkdir(tmp, dir_fd=parent)
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
            try:
                for name, data in files.items():
                    with open_new(name, fd, 0o666) as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                os.fsync(fd)
            finally:
                os.close(fd)
            _self_check(dest.parent / tmp)
            _publish(parent, tmp, dest, force=force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True, dir_fd=parent)
            raise


def _publish(parent: int, src: str, dest: Path, *, force: bool) -> None:
    """:func:`publish_dir` for names in the directory ``parent``."""
    name = dest.name
    try:
        os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, name, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
        return
    if not force:
        raise ExportError(f"{dest}: exists (pass --force to replace it)")
    if _exchange(parent, src, name):
        old = src  # after the exchange, src holds the old directory
    else:
        old = _tmp_name(dest, "old")
        os.rename(name, old, src_dir_fd=parent, dst_dir_fd=parent)
        os.rename(src, name, src_dir_fd=parent, dst_dir_fd=parent)
    os.fsync(parent)
    shutil.rmtree(old, ignore_errors=True, dir_fd=parent)


def _self_check(model_dir: Path) -> None:
    from bwpredd.checkmodel import check_model_dir

    result = check_model_dir(model_dir)
    if not result.ok:
        raise ExportError(f"the built directory fails check-model: {result.reason}")


def _timings(f_bytes: bytes, a_bytes: bytes, windows: F32, states: F32) -> dict[str, float]:
    f_sess, a_sess = session(f_bytes), session(a_bytes)
    out: dict[str, float] = {}
    for n in (1, 1000):
        reps = 100 if n == 1 else 10
        w = np.ascontiguousarray(np.resize(windows, (n, *windows.shape[1:])))
        s = np.ascontiguousarray(np.resize(states, (n, states.shape[1])))
        out[f"forecaster_batch{n}"] = time_session(f_sess, {"window": w}, repeat=reps) * 1e3
        out[f"allocator_batch{n}"] = time_session(a_sess, {"state": s}, repeat=reps) * 1e3
    return {k: round(v, 4) for k, v in out.items()}


def _fmt_timings(timings: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f} ms" for k, v in timings.items())


def _fmt_sizes(sizes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in sizes.items())


def _versions() -> dict[str, str]:
    from importlib import metadata

    try:
        bwpredd_version = metadata.version("bwpredd")
    except metadata.PackageNotFoundError:
        bwpredd_version = "unknown"
    return {
        "torch": str(torch.__version__),
        "onnx": str(onnx.__version__),
        "onnxruntime": str(ort.__version__),
        "bwpredd": bwpredd_version,
    }


def _tmp_name(dest: Path, what: str) -> str:
    """A hidden name beside ``dest`` that nobody can predict."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    return f".{dest.name}.{what}-{stamp}-{os.getpid()}-{os.urandom(3).hex()}"


def _exchange(parent: int, a: str, b: str) -> bool:
    """Atomically swap two names in the directory ``parent`` with Linux
    ``renameat2``; False if unsupported."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(parent, os.fsencode(a), parent, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(rc == 0)
