"""The optimised request path gives the same answers as the plain code.

The plain implementations below are the straightforward NumPy versions the
daemon used to run (``np.percentile``, ``np.median``, ``np.std``, a Python
loop for the EWMA, no fast paths in the engine). The optimised functions must
give the same numbers on many random windows: full and cold-start counts,
outages (zeros), constant windows, scales from kbit/s to 10 Gbit/s.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from bwpredd import baselines
from bwpredd.engine import BASELINE_ALPHA, Engine, Source, edge_pad
from bwpredd.modeldir import DEFAULT_MODEL_DIR, FORECASTER_CHUNK, load_model
from bwpredd.schema import BW, LAT, LOSS, REL
from bwpredd.state import STATE_LAYOUT, build_state, reference_capacity

W = 10
WIDTH = 4


# --- the plain reference implementations ----------------------------------


def plain_reference_capacity(windows: np.ndarray) -> np.ndarray:
    p90 = np.percentile(windows[:, :, BW].astype(np.float64), 90, axis=1)
    return np.maximum(p90, 1e-3).astype(np.float32)


def plain_build_state(  # noqa: PLR0917 (build_state's signature)
    windows: np.ndarray,
    point: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    step_s: np.ndarray | float,
    capacity: np.ndarray | None = None,
) -> np.ndarray:
    w = windows.astype(np.float64)
    step_ms = 1000.0 * np.asarray(step_s, np.float64)
    cap = (plain_reference_capacity(windows) if capacity is None else capacity).astype(np.float64)
    bw = w[:, :, BW]
    lat = w[:, :, LAT]
    base_lat = np.maximum(lat.min(axis=1), 1e-3)
    cols = [
        np.log1p(lat[:, -1]),
        bw[:, -1] / cap,
        w[:, -1, LOSS],
        w[:, -1, REL],
        np.asarray(point, np.float64) / cap,
        np.asarray(low, np.float64) / cap,
        np.asarray(high, np.float64) / cap,
        bw.mean(axis=1) / cap,
        bw.std(axis=1) / cap,
        lat[:, -1] / base_lat - 1.0,
        (lat[:, -1] - lat[:, -2]) / base_lat,
        w[:, -1, LOSS] - w[:, :, LOSS].mean(axis=1),
        (lat[:, -1] - lat.min(axis=1)) / step_ms,
        (lat[:, -1] - lat[:, -2]) / step_ms,
        bw.min(axis=1) / cap,
        np.median(bw, axis=1) / cap,
    ]
    return np.clip(np.stack(cols, axis=1), -50.0, 50.0).astype(np.float32)


def plain_ewma(windows: np.ndarray, counts: np.ndarray | None, alpha: float) -> np.ndarray:
    n, w = windows.shape[0], windows.shape[1]
    c = np.full(n, w) if counts is None else np.clip(counts, 1, w)
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        bw = windows[i, w - c[i] :, BW].astype(np.float64)
        est = bw[0]
        for x in bw[1:]:
            est = alpha * x + (1 - alpha) * est
        out[i] = est
    return out


def plain_baseline_interval(
    windows: np.ndarray, point: np.ndarray, counts: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    n, w = windows.shape[0], windows.shape[1]
    c = np.full(n, w) if counts is None else np.clip(counts, 1, w)
    low = np.empty(n, dtype=np.float32)
    high = np.empty(n, dtype=np.float32)
    for i in range(n):
        logbw = np.log(np.maximum(windows[i, w - c[i] :, BW].astype(np.float64), 1e-3))
        d = np.diff(logbw)
        sigma = np.std(d, ddof=1) if len(d) >= 2 else baselines.DEFAULT_LOG_SIGMA
        p = float(point[i])
        low[i] = p * np.exp(-baselines.Z80 * sigma)
        high[i] = p * np.exp(baselines.Z80 * sigma)
    return low, high


def plain_forecast(engine: Engine, windows: np.ndarray, counts: np.ndarray, force=None):
    """Engine.forecast without fast paths: every step on every peer."""
    model = engine.model
    k = len(windows)
    base = plain_ewma(windows, counts, BASELINE_ALPHA)
    point = base.copy()
    low, high = plain_baseline_interval(windows, base, counts)
    full = counts >= W
    source = np.where(full, Source.BASELINE_FALLBACK, Source.BASELINE_COLD_START).astype(np.int8)
    model_point = np.full(k, np.nan, dtype=np.float32)
    if model is not None:
        for i in np.flatnonzero(full):
            outs = model.forecaster.run(None, {"window": windows[i : i + 1]})
            p, lo, hi = (float(x[0, 0]) for x in outs)
            if not all(np.isfinite([p, lo, hi])):
                continue
            model_point[i] = p
            if force is not None and force[i]:
                continue
            point[i], low[i], high[i] = p, min(lo, p), max(hi, p)
            source[i] = Source.MODEL
    return point, low, high, source, base, model_point


def plain_allocate(engine: Engine, windows, counts, point, low, high, source, step):  # noqa: PLR0917
    model = engine.model
    full = edge_pad(windows, counts)
    cap = plain_reference_capacity(full)
    action = np.clip(np.rint(point / cap * 10) - 1, 0, 9).astype(np.int64)
    step = np.broadcast_to(np.asarray(step, np.float32), cap.shape)
    for i in np.flatnonzero(source == Source.MODEL):
        st = plain_build_state(
            full[i : i + 1], point[i : i + 1], low[i : i + 1], high[i : i + 1], step[i : i + 1]
        )
        action[i] = int(np.argmax(model.allocator.run(None, {"state": st})[0][0]))
    return action, cap


# --- random windows ----------------------------------------------------------


def random_windows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Windows of every kind the daemon sees (NaN-free: ingest rejects NaN)."""
    scale = 10 ** rng.uniform(-3, 4, size=(n, 1))
    bw = scale * np.exp(rng.normal(0, rng.uniform(0, 1.5, size=(n, 1)), size=(n, W)))
    kind = rng.integers(0, 6, size=n)
    bw[kind == 0] = 0.0  # an outage
    bw[kind == 1] = bw[kind == 1, :1]  # constant
    outage = (kind == 2)[:, None] & (rng.random((n, W)) < 0.3)
    bw[outage] = 0.0  # some zero samples
    bw[kind == 3] = np.round(bw[kind == 3])  # ties
    lat = rng.uniform(0, 300, size=(n, W))
    lat[kind == 4] = 0.0  # no latency measured
    loss = np.where(rng.random((n, W)) < 0.5, 0.0, rng.uniform(0, 1, size=(n, W)))
    rel = rng.uniform(0, 1, size=(n, W))
    out = np.stack([lat, bw, loss, rel], axis=2).astype(np.float32)
    assert out.shape[2] == WIDTH
    return out


def cases(seed: int, rounds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        n = int(rng.choice([1, 1, 2, 3, 7, 64, 333]))
        windows = random_windows(rng, n)
        if r % 3 == 0:
            counts = np.full(n, W, dtype=np.int64)
        else:
            counts = rng.integers(1, W + 1, size=n).astype(np.int64)
            windows[np.arange(W)[None, :] < (W - counts)[:, None]] = 0.0  # padding rows
        yield windows, counts


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(load_model(DEFAULT_MODEL_DIR))


# --- the tests ----------------------------------------------------------------


def test_capacity_and_state_match_plain() -> None:
    """reference_capacity and build_state (with and without a given capacity,
    scalar and per-window steps) equal the np.percentile/np.median/np.std code."""
    rng = np.random.default_rng(7)
    for windows, _ in cases(1, 300):
        n = len(windows)
        cap = reference_capacity(windows)
        np.testing.assert_allclose(cap, plain_reference_capacity(windows), rtol=1e-6)
        point = (rng.uniform(0, 2, n) * cap).astype(np.float32)
        low = (point * rng.uniform(0, 1, n)).astype(np.float32)
        high = (point * rng.uniform(1, 3, n)).astype(np.float32)
        step = rng.choice([0.05, 1.0, 5.0], size=n).astype(np.float32)
        for s in (step, 1.0):
            got = build_state(windows, point, low, high, s, cap)
            assert got.shape == (n, len(STATE_LAYOUT))
            np.testing.assert_array_equal(got, plain_build_state(windows, point, low, high, s, cap))
            np.testing.assert_array_equal(
                build_state(windows, point, low, high, s),
                plain_build_state(windows, point, low, high, s, cap),
            )


def test_baselines_match_plain() -> None:
    """The EWMA and the baseline interval equal their per-window loops."""
    for windows, counts in cases(2, 300):
        for c in (counts, None):
            base = baselines.ewma(windows, c, BASELINE_ALPHA)
            np.testing.assert_allclose(
                base, plain_ewma(windows, c, BASELINE_ALPHA), rtol=1e-6, atol=1e-30
            )
            lo, hi = baselines.baseline_interval(windows, base, c)
            plo, phi = plain_baseline_interval(windows, base, c)
            np.testing.assert_allclose(lo, plo, rtol=1e-5, atol=1e-30)
            np.testing.assert_allclose(hi, phi, rtol=1e-5, atol=1e-30)


def test_engine_matches_plain(engine: Engine) -> None:
    """Engine.forecast and Engine.allocate give the answers of the plain
    per-peer path (one model run per peer) on mixed batches, with and
    without the guardrail's forced baseline."""
    rng = np.random.default_rng(3)
    for windows, counts in cases(4, 60):
        n = len(windows)
        force = rng.random(n) < 0.3 if rng.random() < 0.5 else None
        fc = engine.forecast(windows, counts, force)
        want = plain_forecast(engine, windows, counts, force)
        for got, ref in zip(
            (fc.point, fc.low, fc.high, fc.source, fc.baseline, fc.model_point),
            want,
            strict=True,
        ):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-30)
        np.testing.assert_array_equal(fc.source, want[3])
        step = rng.choice([0.5, 1.0], size=n).astype(np.float32)
        al = engine.allocate(windows, counts, fc, step)
        action, cap = plain_allocate(
            engine, windows, counts, fc.point, fc.low, fc.high, fc.source, step
        )
        np.testing.assert_array_equal(al.action, action)
        np.testing.assert_allclose(al.capacity, cap, rtol=1e-6)


def test_batch_one_sessions_match_general(engine: Engine) -> None:
    """The batch-of-one sessions are loaded and answer every window and state
    exactly (bit for bit) as the general sessions do."""
    model = engine.model
    assert model is not None
    assert model.forecaster_one is not None and model.allocator_one is not None
    rng = np.random.default_rng(5)
    windows = random_windows(rng, 300)
    point, low, high = (x[:, 0] for x in model.forecaster.run(None, {"window": windows}))
    states = build_state(windows, point, low, high, 1.0)
    for i in range(len(windows)):
        one = windows[i : i + 1]
        want = model.forecaster.run(None, {"window": one})
        got = model.run_forecaster(one)
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a[:, 0], b)
        q = model.allocator.run(None, {"state": states[i : i + 1]})[0]
        np.testing.assert_array_equal(model.q_values(states[i : i + 1]), q)


def test_private_run_falls_back_to_the_public_one(engine: Engine) -> None:
    """Where an onnxruntime's private session takes other arguments, the run
    goes through the public ``run`` and gives the same outputs."""
    from bwpredd.manifest import FORECASTER_INPUT, FORECASTER_OUTPUTS
    from bwpredd.modeldir import _run

    class OtherSignature:
        def run(self, outputs: list[str], feed: dict[str, object]) -> list[object]:
            raise AssertionError("never called with two arguments")

    class Session:  # the real session, with an incompatible private one
        def __init__(self, real: object) -> None:
            self._real, self._sess, self.public_runs = real, OtherSignature(), 0

        def run(self, outputs: list[str], feed: dict[str, object]) -> list[object]:
            self.public_runs += 1
            return self._real.run(outputs, feed)  # type: ignore[attr-defined, no-any-return]

    assert engine.model is not None
    real = engine.model.forecaster
    feed = {FORECASTER_INPUT: random_windows(np.random.default_rng(5), 3)}
    outputs = list(FORECASTER_OUTPUTS)
    proxy = Session(real)
    got = _run(proxy, outputs, feed)  # type: ignore[arg-type]
    want = real.run(outputs, feed)
    assert proxy.public_runs == 1
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize(
    "n", [FORECASTER_CHUNK, FORECASTER_CHUNK + 1, 2 * FORECASTER_CHUNK + 7, 999]
)
def test_chunked_forecaster_runs_match_one_run(engine: Engine, n: int) -> None:
    """A large batch runs in chunks of FORECASTER_CHUNK windows on a
    one-thread session (the last chunk may be a single window, served by
    the batch-of-one session) and answers as one run of the general session
    does."""
    model = engine.model
    assert model is not None
    assert model.forecaster_chunk == FORECASTER_CHUNK
    windows = random_windows(np.random.default_rng(n), n)
    want = model.forecaster.run(None, {"window": windows})
    got = model.run_forecaster(windows)
    for a, b in zip(want, got, strict=True):
        assert b.shape == (n,)
        np.testing.assert_allclose(b, a[:, 0], rtol=1e-6, atol=0)


def test_two_thread_model_runs_one_batch() -> None:
    """With two intra-op threads one run splits better: no chunks."""
    assert load_model(DEFAULT_MODEL_DIR, threads=2).forecaster_chunk == 0
