"""A model directory, opened: the one way to load and run the shipped models.

The daemon, ``bwpredd check-model``, the trainer's evaluators and the
export's final check all go through :func:`load_model`, so they agree on
what a valid directory is. In order, each stopping at the first failure:

1. ``manifest.json`` parses under the schema (:mod:`bwpredd.manifest`);
2. each file's sha256 matches, and the sessions are built from exactly the
   bytes that were checked;
3. the allocator's ``state_layout`` is the one this bwpredd builds;
4. every graph (the forecaster, the allocator and, when the manifest
   declares horizons, the horizon graph) loads in onnxruntime, and their
   inputs and outputs have the manifest's names (in order), dtypes and shapes;
5. a smoke run (also the warm-up) on :func:`smoke_windows`, batches of one
   and of all, gives finite float32 ``[N, 1]`` forecasts with ``low <= point
   <= high``, finite float32 ``[N, 10]`` ``q_values`` on states built as
   the daemon builds them, and (horizon graph) finite float32 ``[N, H]``
   means with ``0 <= low <= mean <= high`` at steps of 0.5, 1 and 5 s.

:func:`session` is the only place an ``onnxruntime.InferenceSession`` is made.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# onnxruntime phones home (a device-id database and an events endpoint)
# unless told not to before it loads; a sidecar must not.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
import onnxruntime as ort

from bwpredd.errors import ManifestError, ModelError
from bwpredd.manifest import (
    ALLOCATOR_INPUT,
    ALLOCATOR_OUTPUT,
    FORECASTER_INPUT,
    FORECASTER_OUTPUTS,
    HORIZON_INPUTS,
    HORIZON_OUTPUTS,
    N_ACTIONS,
    Manifest,
    ModelFile,
    TensorSpec,
    load_manifest,
    verify_files,
)
from bwpredd.schema import WINDOW, stack
from bwpredd.state import DEFAULT_STEP_S, STATE_LAYOUT, build_state

__all__ = [
    "DEFAULT_MODEL_DIR",
    "LoadedModel",
    "load_model",
    "session",
    "smoke_windows",
    "synthetic_windows",
]

# The model shipped inside the package (what `make export` writes).
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"
F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(int64)": "int64"}
# Output names as the lists onnxruntime takes, built once.
_FORECASTER_OUTS = list(FORECASTER_OUTPUTS)
_ALLOCATOR_OUTS = [ALLOCATOR_OUTPUT]
# A point forecast may stray outside its interval by float rounding only.
_ORDER_SLACK = 1e-5
# Windows per forecaster run when a session has one thread: the LSTMs' gates
# for 64 windows stay in a core's L2 cache where those of 999 do not, and
# 999 windows in runs of 64 cost about 10% less CPU than in one run, with
# the same answers bit for bit (reports/profile.md, section 9). With more
# threads one run splits better.
FORECASTER_CHUNK = 64


def session(
    data: bytes, *, threads: int = 1, optimise: bool = True, batch_one: str | None = None
) -> ort.InferenceSession:
    """An onnxruntime CPU session on a serialised model, set up as the daemon runs it.

    Args:
        data: the serialised ONNX model.
        threads: intra-op threads (inter-op is 1, execution sequential).
        optimise: ``ORT_ENABLE_ALL`` when true, else no graph optimisation
            (the export checks its graphs both ways).
        batch_one: the name of the graph's batch dimension, to fix it at 1:
            onnxruntime then folds the shape arithmetic of the graph into
            constants, which makes a one-window run about 10% cheaper.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimise
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # A sidecar must not burn a core spinning between calls.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if batch_one is not None:
        opts.add_free_dimension_override_by_name(batch_one, 1)
    return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class LoadedModel:
    """A verified, warmed-up model directory."""

    manifest: Manifest
    path: Path
    forecaster: ort.InferenceSession
    allocator: ort.InferenceSession
    load_seconds: float
    sha256: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    horizon: ort.InferenceSession | None = None  # when the manifest declares horizons
    # The same graphs with the batch fixed at one (a peer's call right after
    # its sample), when they give the general sessions' answers exactly.
    forecaster_one: ort.InferenceSession | None = None
    allocator_one: ort.InferenceSession | None = None
    forecaster_chunk: int = 0  # windows per forecaster run; 0: any batch in one run

    @property
    def version(self) -> str:
        return self.manifest.version

    def run_horizon(self, windows: F32, step_s: F32) -> tuple[F32, F32, F32]:
        """Mean, low, high ``[k, H]`` (Mbit/s) over the manifest's horizons
        for full windows ``[k, W, F]`` and their steps ``[k]`` (seconds).

        Raises:
            ValueError: the model declares no horizons.
        """
        if self.horizon is None:
            raise ValueError("this model directory declares no horizons")
        feed = {
            HORIZON_INPUTS[0]: windows,
            HORIZON_INPUTS[1]: np.ascontiguousarray(step_s, dtype=np.float32).reshape(-1, 1),
        }
        out = self.horizon.run(list(HORIZON_OUTPUTS), feed)
        return out[0], out[1], out[2]

    def run_forecaster(self, windows: F32) -> tuple[F32, F32, F32]:
        """Point, low, high ``[k]`` for full windows ``[k, W, F]``."""
        chunk = self.forecaster_chunk
        if chunk and len(windows) > chunk:
            parts = [
                self.run_forecaster(windows[i : i + chunk]) for i in range(0, len(windows), chunk)
            ]
            point, low, high = (np.concatenate(p) for p in zip(*parts, strict=True))
            return point, low, high
        sess = self.forecaster
        if len(windows) == 1 and self.forecaster_one is not None:
            sess = self.forecaster_one
        out = _run(sess, _FORECASTER_OUTS, {FORECASTER_INPUT: windows})
        return out[0][:, 0], out[1][:, 0], out[2][:, 0]

    def q_values(self, states: F32) -> F32:
        """The allocator's ``[k, 10]`` Q-values for states ``[k, S]``."""
        sess = self.allocator
        if len(states) == 1 and self.allocator_one is not None:
            sess = self.allocator_one
        (q,) = _run(sess, _ALLOCATOR_OUTS, {ALLOCATOR_INPUT: states})
        out: F32 = q
        return out

    def run_allocator(self, states: F32) -> I64:
        """Greedy actions ``[k]`` for states ``[k, S]``: argmax, never random."""
        actions: I64 = np.argmax(self.q_values(states), axis=1).astype(np.int64)
        return actions


def _run(sess: ort.InferenceSession, outputs: list[str], feed: dict[str, Any]) -> list[Any]:
    """``sess.run(outputs, feed)`` without the Python wrapper's per-call
    checks of the input names (the feeds here are built from the checked
    manifest): the C session's run, where this onnxruntime exposes it."""
    inner = getattr(sess, "_sess", None)
    if inner is not None:
        try:
            return list(inner.run(outputs, feed, None))
        except TypeError:  # another onnxruntime's private signature: the public run
            pass
    return list(sess.run(outputs, feed))


def smoke_windows(n: int = 64, seed: int = 0) -> F32:
    """Seeded raw windows ``[n, WINDOW, WIDTH]``: bandwidth from 0.05 Mbit/s to 10 Gbit/s;
    the first is all zero (an outage), the second constant.

    The smoke run's checklist, not a sample of plausible links (that is
    :func:`synthetic_windows`): the levels are spread evenly in log space so
    every order of magnitude is run, and the two edge cases always come first.

    Args:
        n: how many windows.
        seed: the generator's seed.
    """
    rng = np.random.default_rng(seed)
    level = np.exp(np.linspace(np.log(0.05), np.log(10_000.0), n))[:, None]
    bw = level * np.exp(np.cumsum(rng.normal(0.0, 0.2, size=(n, WINDOW)), axis=1))
    lat = np.exp(rng.uniform(0.0, 5.0, size=(n, 1))) * (1 + rng.random((n, WINDOW)) * 0.3)
    loss = rng.uniform(0.0, 0.05, size=(n, WINDOW))
    rel = rng.uniform(0.9, 1.0, size=(n, WINDOW))
    bw[:1] = 0.0
    bw[1:2] = 25.0
    out: F32 = stack(
        {"latency_ms": lat, "bandwidth_mbps": bw, "packet_loss": loss, "reliability": rel}
    )
    return out


def synthetic_windows(n: int, seed: int = 0, *, mbps: tuple[float, float] = (0.1, 10_000.0)) -> F32:
    """Seeded plausible raw windows ``[n, WINDOW, WIDTH]``: each a random walk of
    bandwidth around a level drawn log-uniformly from ``mbps``, with its own
    volatility and occasional outages (2% of samples at 0), and latency, loss
    and reliability to match. Every value is a valid sample and float32, so a
    daemon fed these windows stores exactly them.

    The daemon does not use it: export's parity check falls back to it when no
    traces are at hand, and the tests and the bench use it (through
    :mod:`bench.harness`); it lives here, next to :func:`smoke_windows`, so
    all of them read one generator without importing torch.

    Args:
        n: how many windows.
        seed: the generator's seed.
        mbps: the range of the windows' bandwidth levels, Mbit/s.
    """
    rng = np.random.default_rng(seed)
    level = np.exp(rng.uniform(np.log(mbps[0]), np.log(mbps[1]), size=(n, 1)))
    walk = np.cumsum(rng.normal(0.0, rng.uniform(0.02, 0.5, size=(n, 1)), size=(n, WINDOW)), 1)
    bw = level * np.exp(walk)
    bw[rng.random((n, WINDOW)) < 0.02] = 0.0
    base = np.exp(rng.uniform(np.log(0.2), np.log(300.0), size=(n, 1)))
    lat = base * (1.0 + np.abs(rng.normal(0.0, 0.2, size=(n, WINDOW))))
    loss = np.clip(rng.exponential(0.003, size=(n, WINDOW)), 0.0, 1.0)
    rel = np.clip(1.0 - rng.exponential(0.01, size=(n, WINDOW)), 0.0, 1.0)
    out: F32 = stack(
        {"latency_ms": lat, "bandwidth_mbps": bw, "packet_loss": loss, "reliability": rel}
    )
    return out


class _Refused(Exception):
    """A check failed; the message says which and why (without the path)."""


def load_model(model_dir: Path, threads: int = 1) -> LoadedModel:
    """Verify, load, warm up and smoke-test a model directory.

    Args:
        model_dir: a directory with ``manifest.json`` and the ONNX files.
        threads: onnxruntime intra-op threads per session.

    Raises:
        ModelError: a check failed, or anything else went wrong; ``reason``
            says which and why, the message adds the directory.
    """
    model_dir = Path(model_dir)
    try:
        return _load(model_dir, threads)
    except (ManifestError, _Refused) as exc:
        raise ModelError(f"{model_dir}: {exc}", reason=str(exc)) from None
    except Exception as exc:  # a directory no check foresaw is a refused load, never a crash
        reason = f"cannot load: {type(exc).__name__}: {exc}"
        raise ModelError(f"{model_dir}: {reason}", reason=reason) from exc


def _load(model_dir: Path, threads: int) -> LoadedModel:
    start = time.perf_counter()
    manifest = load_manifest(model_dir)
    blobs = verify_files(model_dir, manifest)
    if manifest.state_layout != STATE_LAYOUT:
        # Same width in another order would run, and allocate from misread states.
        raise _Refused(
            f"state_layout: the allocator was trained on {list(manifest.state_layout)}, "
            f"this bwpredd builds {list(STATE_LAYOUT)}; export the model again with this version"
        )
    t0 = time.perf_counter()
    fsess = _session(blobs[manifest.forecaster.file], manifest.forecaster.file, threads)
    asess = _session(blobs[manifest.allocator.file], manifest.allocator.file, threads)
    hsess = None
    if manifest.horizon is not None:
        hsess = _session(blobs[manifest.horizon.file], manifest.horizon.file, threads)
    timings = {"load": (time.perf_counter() - t0) * 1e3}
    _check_io(fsess, manifest.forecaster)
    _check_io(asess, manifest.allocator)
    if hsess is not None and manifest.horizon is not None:
        _check_io(hsess, manifest.horizon)
    model = LoadedModel(manifest, model_dir, fsess, asess, 0.0, horizon=hsess)
    _smoke(model, timings)
    smoke = smoke_windows()
    states = build_state(smoke, *model.run_forecaster(smoke), DEFAULT_STEP_S)
    f_one = _batch_one(
        blobs[manifest.forecaster.file], fsess, threads, FORECASTER_INPUT, smoke[:16]
    )
    a_one = _batch_one(blobs[manifest.allocator.file], asess, threads, ALLOCATOR_INPUT, states[:16])
    graphs = [manifest.forecaster, manifest.allocator]
    if manifest.horizon is not None:
        graphs.append(manifest.horizon)
    return LoadedModel(
        manifest=manifest,
        path=model_dir,
        forecaster=fsess,
        allocator=asess,
        load_seconds=time.perf_counter() - start,
        sha256={m.file: m.sha256 for m in graphs},
        sizes={name: len(data) for name, data in blobs.items()},
        timings_ms={k: round(v, 3) for k, v in timings.items()},
        horizon=hsess,
        forecaster_one=f_one,
        allocator_one=a_one,
        forecaster_chunk=FORECASTER_CHUNK if threads == 1 else 0,
    )


def _batch_one(
    data: bytes, general: ort.InferenceSession, threads: int, name: str, rows: F32
) -> ort.InferenceSession | None:
    """``general``'s graph with its batch dimension fixed at 1, if it names
    that dimension and answers each of ``rows`` exactly as ``general`` does;
    else None (the general session serves batches of one too)."""
    dim = general.get_inputs()[0].shape[0]
    if not isinstance(dim, str) or not dim:
        return None
    try:
        one = session(data, threads=threads, batch_one=dim)
        for i in range(len(rows)):
            feed = {name: rows[i : i + 1]}
            want, got = general.run(None, feed), one.run(None, feed)
            if not all(np.array_equal(a, b) for a, b in zip(want, got, strict=True)):
                return None
    except Exception:  # onnxruntime's own types: an optimisation, never a refused load
        return None
    return one


def _session(data: bytes, name: str, threads: int) -> ort.InferenceSession:
    try:
        return session(data, threads=threads)
    except Exception as exc:  # onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _Refused(f"{name}: onnxruntime cannot load it: {first}") from None


def _check_io(sess: ort.InferenceSession, spec: ModelFile) -> None:
    for kind, got, want in (
        ("inputs", sess.get_inputs(), spec.inputs),
        ("outputs", sess.get_outputs(), spec.outputs),
    ):
        got_names = [a.name for a in got]
        want_names = [t.name for t in want]
        if got_names != want_names:
            raise _Refused(f"{spec.file}: {kind} are {got_names}, the manifest says {want_names}")
        for arg, t in zip(got, want, strict=True):
            _check_tensor(spec.file, arg, t)


def _check_tensor(file: str, arg: Any, spec: TensorSpec) -> None:
    dtype = _ORT_DTYPES.get(str(arg.type), str(arg.type))
    if dtype != spec.dtype:
        raise _Refused(f"{file}: {spec.name} is {dtype}, the manifest says {spec.dtype}")
    shape = tuple(d if isinstance(d, int) else None for d in arg.shape)
    if shape != spec.shape:
        raise _Refused(
            f"{file}: {spec.name} has shape {_fmt(shape)}, the manifest says {_fmt(spec.shape)}"
        )


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _smoke(model: LoadedModel, timings: dict[str, float]) -> None:
    """Both graphs on a batch of one, then on all of :func:`smoke_windows`
    (the first runs also allocate and plan: the warm-up)."""
    windows = smoke_windows()
    for batch in (windows[:1], windows):
        n = len(batch)
        t0 = time.perf_counter()
        outs = model.forecaster.run(list(FORECASTER_OUTPUTS), {FORECASTER_INPUT: batch})
        timings[f"forecast_batch{n}"] = (time.perf_counter() - t0) * 1e3
        point, low, high = (
            _forecast_output(name, out, n)
            for name, out in zip(FORECASTER_OUTPUTS, outs, strict=True)
        )
        slack = _ORDER_SLACK * np.maximum(np.abs(point), 1.0)
        bad = (low > point + slack) | (point > high + slack)
        if bad.any():
            i = int(np.argmax(bad))
            raise _Refused(
                f"smoke: interval out of order on {int(bad.sum())} of {n} windows "
                f"(e.g. low {low[i]:.4g}, point {point[i]:.4g}, high {high[i]:.4g})"
            )
        states = build_state(batch, point, low, high, DEFAULT_STEP_S)
        t0 = time.perf_counter()
        q = np.asarray(model.q_values(states))
        timings[f"allocate_batch{n}"] = (time.perf_counter() - t0) * 1e3
        if q.shape != (n, N_ACTIONS) or q.dtype != np.float32:
            raise _Refused(
                f"smoke: q_values came out {q.dtype}{list(q.shape)}, want float32[{n}, {N_ACTIONS}]"
            )
        if not np.isfinite(q).all():
            raise _Refused("smoke: q_values are not finite")
        if model.horizon is not None:
            _smoke_horizon(model, batch, timings)


# Steps the horizon graph is smoke-tested at: the shortest and longest the
# shipped traces have, and the daemon's default.
_SMOKE_STEPS_S = (0.5, 1.0, 5.0)


def _smoke_horizon(model: LoadedModel, batch: F32, timings: dict[str, float]) -> None:
    n, h = len(batch), len(model.manifest.horizons)
    for step in _SMOKE_STEPS_S:
        t0 = time.perf_counter()
        outs = model.run_horizon(batch, np.full(n, step, dtype=np.float32))
        timings.setdefault(f"horizon_batch{n}", (time.perf_counter() - t0) * 1e3)
        arrs = [np.asarray(o) for o in outs]
        for name, arr in zip(HORIZON_OUTPUTS, arrs, strict=True):
            if arr.shape != (n, h) or arr.dtype != np.float32:
                raise _Refused(
                    f"smoke: horizon {name} came out {arr.dtype}{list(arr.shape)}, "
                    f"want float32[{n}, {h}]"
                )
            if not np.isfinite(arr).all():
                raise _Refused(f"smoke: horizon {name} is not finite at step {step:g} s")
        mean, low, high = arrs
        slack = _ORDER_SLACK * np.maximum(np.abs(mean), 1.0)
        bad = (low < 0) | (low > mean + slack) | (mean > high + slack)
        if bad.any():
            raise _Refused(
                f"smoke: horizon interval out of order (or negative) on {int(bad.sum())} "
                f"of {n * h} values at step {step:g} s"
            )


def _forecast_output(name: str, out: Any, n: int) -> F32:
    arr = np.asarray(out)
    if arr.shape != (n, 1) or arr.dtype != np.float32:
        raise _Refused(f"smoke: {name} came out {arr.dtype}{list(arr.shape)}, want float32[{n}, 1]")
    if not np.isfinite(arr).all():
        raise _Refused(f"smoke: {name} is not finite for {int((~np.isfinite(arr)).sum())}")
    column: F32 = arr[:, 0]
    return column
