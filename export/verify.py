"""Check exported graphs against torch, the source of truth, in onnxruntime.

Every graph is run twice, with onnxruntime's graph optimisations off and at
``ORT_ENABLE_ALL`` (what the daemon serves), on seeded real windows from the
traces and on allocator states built from them with
:func:`bwpredd.state.build_state`, exactly as the daemon builds them.

How errors are measured. Forecaster: ``|ort - torch| / max(|torch|, 1e-3 m)``
per value, with ``m`` the window's mean bandwidth; the floor keeps a forecast
that the clamp at 0 left near 0 (``m e^r - 0.01 m`` cancels) from dividing by
~0. Allocator: ``|ort - torch| / max_a |torch q_a|`` per row, the error
relative to the row's Q-value scale, and the greedy action must agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch
from torch import nn

from bwpredd.manifest import (
    ALLOCATOR_INPUT,
    ALLOCATOR_OUTPUT,
    FORECASTER_INPUT,
    FORECASTER_OUTPUTS,
)
from bwpredd.modeldir import session, synthetic_windows
from bwpredd.schema import BW, WIDTH, WINDOW
from bwpredd.state import DEFAULT_STEP_S, build_state
from bwpredd.traces import load_traces
from trainer.data.traces import default_traces_dir
from trainer.data.windows import make_windows
from trainer.predict import forecast_fn

__all__ = [
    "MAX_REL_ERR",
    "ParityError",
    "ParityReport",
    "allocator_parity",
    "forecaster_parity",
    "parity_windows",
    "time_session",
    "torch_forecast",
]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
MAX_REL_ERR = 1e-4
_OPT_LEVELS: dict[str, bool] = {  # name: optimise
    "disabled": False,
    "enabled_all": True,
}


class ParityError(AssertionError):
    """onnxruntime disagrees with torch beyond the tolerance."""


@dataclass
class ParityReport:
    """What one graph's parity check measured."""

    max_rel_err: float
    max_abs_err: float
    n: int
    per_level: dict[str, float] = field(default_factory=dict)
    action_agreement: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        out: dict[str, Any] = {
            "max_rel_err": self.max_rel_err,
            "max_abs_err": self.max_abs_err,
            "n": self.n,
            "per_optimisation_level": self.per_level,
        }
        if self.action_agreement is not None:
            out["greedy_action_agreement"] = self.action_agreement
        return out


def parity_windows(
    traces_dir: Path | None, n: int = 2048, seed: int = 0, *, log: Callable[[str], None] = print
) -> tuple[F32, str]:
    """Seeded real windows from the traces, or synthetic ones when the trace
    loader or the traces are not available.

    Args:
        traces_dir: the traces directory; None means the loader's default.
        n: how many windows to sample (fewer if the traces hold fewer).
        seed: the sampling seed.
        log: where progress lines go.

    Returns:
        ``[n, WINDOW, WIDTH]`` raw windows and a description of where they came from.
    """
    try:
        x, sources, where = _trace_windows(traces_dir)
    except Exception as exc:  # any failure of the loader means: fall back
        log(f"parity: no trace windows ({type(exc).__name__}: {exc}); using synthetic windows")
        return synthetic_windows(n, seed), f"synthetic (seed {seed})"
    # Stratify by source so every network type (3G to mmWave) is compared,
    # not just the source with the most windows.
    rng = np.random.default_rng(seed)
    names = sorted(set(sources))
    per = max(1, n // len(names))
    pick: list[int] = []
    for name in names:
        idx = np.flatnonzero(sources == name)
        pick.extend(rng.choice(idx, size=min(per, len(idx)), replace=False).tolist())
    log(f"parity: {len(pick)} of {len(x)} trace windows, {len(names)} sources, from {where}")
    return np.ascontiguousarray(x[np.sort(pick)], dtype=np.float32), (
        f"traces {where}: {len(pick)} windows, {per} per source from {len(names)} sources, "
        f"seed {seed}"
    )


def _trace_windows(traces_dir: Path | None) -> tuple[F32, npt.NDArray[np.str_], str]:
    where = Path(traces_dir) if traces_dir is not None else default_traces_dir()
    traces = load_traces(where).traces
    made = make_windows(traces)
    x = np.asarray(made.x, dtype=np.float32)
    if x.ndim != 3 or x.shape[1:] != (WINDOW, WIDTH) or len(x) == 0:
        raise ValueError(f"unexpected window array shape {x.shape}")
    sources = np.asarray([traces[i].source for i in made.trace])
    finite = np.isfinite(x).all(axis=(1, 2))
    return x[finite], sources[finite], str(where)


def forecaster_parity(
    model: nn.Module, model_bytes: bytes, windows: F32, ref: Sequence[F64] | None = None
) -> ParityReport:
    """Compare the forecaster graph with torch on raw windows.

    Args:
        model: the torch forecaster (run in eval mode).
        model_bytes: its exported graph.
        windows: ``[N, WINDOW, WIDTH]`` raw windows.
        ref: ``torch_forecast(model, windows)`` if already computed.

    Raises:
        ParityError: an output name or shape is wrong or the error exceeds
            :data:`MAX_REL_ERR`.
    """
    ref = ref if ref is not None else torch_forecast(model, windows)
    m = np.maximum(np.clip(windows[:, :, BW], 0, None).mean(axis=1, keepdims=True), 1e-3)
    floor = 1e-3 * m.astype(np.float64)
    per_level: dict[str, float] = {}
    max_abs = 0.0
    for level, optimise in _OPT_LEVELS.items():
        sess = session(model_bytes, optimise=optimise)
        got = sess.run(list(FORECASTER_OUTPUTS), {FORECASTER_INPUT: windows})
        rel = 0.0
        for name, g, r in zip(FORECASTER_OUTPUTS, got, ref, strict=True):
            if g.shape != (len(windows), 1) or g.dtype != np.float32:
                raise ParityError(f"{name}: got {g.dtype}{list(g.shape)}, want float32[N, 1]")
            err = np.abs(g.astype(np.float64) - r)
            max_abs = max(max_abs, float(err.max()))
            rel = max(rel, float((err / np.maximum(np.abs(r), floor)).max()))
        per_level[level] = rel
    report = ParityReport(max(per_level.values()), max_abs, len(windows), per_level)
    if not report.max_rel_err <= MAX_REL_ERR:
        raise ParityError(f"forecaster: max relative error {report.max_rel_err:.3g} > 1e-4")
    return report


def allocator_parity(
    model: nn.Module, model_bytes: bytes, windows: F32, forecasts: Sequence[F64]
) -> tuple[ParityReport, F32]:
    """Compare the allocator graph with torch on states built from windows.

    Args:
        model: the torch Q-network (run in eval mode).
        model_bytes: its exported graph.
        windows: ``[N, WINDOW, WIDTH]`` raw windows.
        forecasts: the torch forecaster's (point, low, high) on ``windows``,
            from :func:`torch_forecast`; they enter the state.

    Returns:
        The report and the states it used.

    Raises:
        ParityError: the output is misshapen, the error exceeds
            :data:`MAX_REL_ERR` or a greedy action differs.
    """
    point, low, high = (r[:, 0].astype(np.float32) for r in forecasts)
    states = build_state(windows, point, low, high, DEFAULT_STEP_S)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(states)).numpy().astype(np.float64)
    model.train(was_training)
    return _q_parity(model_bytes, ref, states), states


def allocator_graph_parity(before: bytes, after: bytes, states: F32) -> ParityReport:
    """Compare two allocator graphs (one rewritten from the other, as
    :func:`export.slim.slim_allocator` does) on ``states``, both run by
    onnxruntime; ``before`` at full optimisation is the reference.

    Raises:
        ParityError: as :func:`allocator_parity`.
    """
    (ref,) = session(before).run([ALLOCATOR_OUTPUT], {ALLOCATOR_INPUT: states})
    return _q_parity(after, ref.astype(np.float64), states)


def _q_parity(model_bytes: bytes, ref: F64, states: F32) -> ParityReport:
    """The allocator graph's Q-values on ``states`` at every optimisation
    level against ``ref``: the error relative to each state's largest
    |Q|, and the share of greedy actions that agree.

    Raises:
        ParityError: the output is misshapen, the error exceeds
            :data:`MAX_REL_ERR` or a greedy action differs.
    """
    scale = np.maximum(np.abs(ref).max(axis=1, keepdims=True), 1e-6)
    per_level: dict[str, float] = {}
    max_abs = 0.0
    agree = 1.0
    for level, optimise in _OPT_LEVELS.items():
        sess = session(model_bytes, optimise=optimise)
        (got,) = sess.run([ALLOCATOR_OUTPUT], {ALLOCATOR_INPUT: states})
        if got.shape != ref.shape or got.dtype != np.float32:
            raise ParityError(f"q_values: got {got.dtype}{list(got.shape)}, want {list(ref.shape)}")
        err = np.abs(got.astype(np.float64) - ref)
        max_abs = max(max_abs, float(err.max()))
        per_level[level] = float((err / scale).max())
        agree = min(agree, float((got.argmax(axis=1) == ref.argmax(axis=1)).mean()))
    report = ParityReport(max(per_level.values()), max_abs, len(states), per_level, agree)
    if not report.max_rel_err <= MAX_REL_ERR:
        raise ParityError(f"allocator: max relative error {report.max_rel_err:.3g} > 1e-4")
    if agree < 1.0:
        # A tie broken differently is the only legitimate cause; with the
        # error this small it would have to be an exact tie.
        raise ParityError(f"allocator: greedy actions agree on only {agree:.4%} of states")
    return report


def time_session(sess: ort.InferenceSession, feeds: dict[str, F32], *, repeat: int = 20) -> float:
    """Median seconds of one ``run`` after a warm-up call.

    Args:
        sess: the session.
        feeds: its inputs.
        repeat: timed calls.
    """
    sess.run(None, feeds)
    samples: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


def torch_forecast(model: nn.Module, windows: F32) -> tuple[F64, F64, F64]:
    """The torch forecaster's (point, low, high), each ``[N, 1]`` float64 as
    the parity check compares them (:func:`trainer.predict.forecast_fn`).

    Args:
        model: the torch forecaster.
        windows: ``[N, WINDOW, WIDTH]`` raw windows.
    """
    point, low, high = (x.astype(np.float64)[:, None] for x in forecast_fn(model)(windows))
    return point, low, high
