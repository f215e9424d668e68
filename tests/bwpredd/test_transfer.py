"""Transfer time (issue 16): horizon curves, Predictor.transfer_time, and the
horizon graph in a model directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from bwpredd import Predictor
from bwpredd.errors import ModelError
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.transfer import HorizonCurves, TransferTime
from tests.conftest_models import make_model_dir

HORIZONS = np.array([0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512], dtype=np.float64)


def window(bw: float | list[float], latency: float = 20.0) -> np.ndarray:
    """A raw [10, 4] window."""
    w = np.zeros((10, 4), dtype=np.float32)
    w[:, 0] = latency
    w[:, 1] = bw
    w[:, 3] = 1.0
    return w


def constant_curves(rate: float, n: int = 1, spread: float = 1.25) -> HorizonCurves:
    """Curves of a link at ``rate`` Mbit/s at every horizon, interval x/÷ spread."""
    m = np.full((n, len(HORIZONS)), rate)
    return HorizonCurves.from_outputs(HORIZONS, m, m / spread, m * spread)


@pytest.fixture(scope="module")
def shipped() -> Predictor:
    return Predictor.load()


@pytest.fixture(scope="module")
def no_horizons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory as export wrote them before horizons."""
    return make_model_dir(tmp_path_factory.mktemp("old") / "m", version="test-old")


@pytest.fixture(scope="module")
def with_horizons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("new") / "m", version="test-new", horizon=True)


class TestHorizonCurves:
    """The numpy core: mean over a horizon, and time from the curves."""

    def test_constant_link_time_is_payload_over_rate(self) -> None:
        """At a constant rate the time is payload / rate, inside the grid,
        below its first horizon and beyond its last."""
        curves = constant_curves(80.0)
        for payload in (1_000, 5e6, 1e8, 1e10, 8 << 30):
            t, fast, slow = curves.seconds(payload)
            want = payload * 8 / 1e6 / 80.0
            assert t[0] == pytest.approx(want, rel=1e-9)
            assert fast[0] == pytest.approx(want / 1.25, rel=1e-9)
            assert slow[0] == pytest.approx(want * 1.25, rel=1e-9)

    def test_larger_payload_never_faster(self) -> None:
        """Time is non-decreasing in the payload, even with curves whose
        bits delivered dip (a running maximum)."""
        rng = np.random.default_rng(0)
        m = np.exp(rng.normal(3.0, 1.0, size=(20, len(HORIZONS))))
        curves = HorizonCurves.from_outputs(HORIZONS, m, m * 0.5, m * 2.0)
        payloads = np.geomspace(1e3, 1e12, 60)
        got = np.stack([curves.seconds(p)[0] for p in payloads], axis=1)
        assert (np.diff(got, axis=1) >= 0).all()

    def test_interval_brackets_and_zero_payload(self) -> None:
        """fast <= point <= slow; a payload of 0 takes 0 s."""
        rng = np.random.default_rng(1)
        m = np.exp(rng.normal(2.0, 2.0, size=(50, len(HORIZONS))))
        curves = HorizonCurves.from_outputs(HORIZONS, m, m * 0.3, m * 1.7)
        t, fast, slow = curves.seconds(np.full(50, 1e9))
        assert (fast <= t).all() and (t <= slow).all()
        assert curves.seconds(0)[0][0] == 0.0

    def test_mean_over_horizon_interpolates_and_clamps(self) -> None:
        """Exact at declared horizons, log-linear between, the end values beyond."""
        m = np.array([[10.0, 20.0] + [40.0] * (len(HORIZONS) - 2)])
        curves = HorizonCurves.from_outputs(HORIZONS, m, m / 2, m * 2)
        assert curves.at(1.0)[0][0] == pytest.approx(20.0)
        assert curves.at(math.sqrt(0.5))[0][0] == pytest.approx(math.sqrt(200.0))
        assert curves.at(0.01)[0][0] == pytest.approx(10.0)
        assert curves.at(10_000.0)[0][0] == pytest.approx(40.0)
        with pytest.raises(ValueError, match="horizon_s"):
            curves.at(-1.0)


class TestPredictorTransferTime:
    """Predictor.transfer_time as issue 16 specifies it."""

    def test_constant_link_gives_payload_over_rate(self, shipped: Predictor) -> None:
        """A link steady at 100 Mbit/s moves 1 GB in about 80 s, whatever the step."""
        for step in (0.5, 1.0, 5.0):
            tt = shipped.transfer_time(window(100.0), 1e9, step_s=step)
            assert tt.seconds == pytest.approx(80.0, rel=0.15)

    def test_longer_payload_never_shorter(self, shipped: Predictor) -> None:
        """On real-looking windows the time never falls as the payload grows."""
        rng = np.random.default_rng(2)
        ws = np.stack([window(list(np.exp(rng.normal(3, 0.5, 10)))) for _ in range(16)])
        payloads = np.geomspace(1e4, 1e12, 40)
        got = np.stack(
            [shipped.transfer_time(ws, np.full(16, p)).seconds for p in payloads], axis=1
        )
        assert (np.diff(got, axis=1) >= -1e-9 * got[:, 1:]).all()

    def test_interval_brackets_point(self, shipped: Predictor) -> None:
        """low_seconds <= seconds <= high_seconds."""
        rng = np.random.default_rng(3)
        ws = np.stack([window(list(np.exp(rng.normal(1, 1.5, 10)))) for _ in range(32)])
        tt = shipped.transfer_time(ws, 5e8, step_s=rng.uniform(0.5, 5, 32))
        assert (tt.low_seconds <= tt.seconds).all() and (tt.seconds <= tt.high_seconds).all()
        assert (tt.low_seconds < tt.high_seconds).all()

    def test_shapes_and_scalars(self, shipped: Predictor) -> None:
        """One window gives floats; a batch float64 [N]; payload and step
        scalars or [N]; a bad shape or value names its argument."""
        one = shipped.transfer_time(window(50.0), 1 << 20)
        assert isinstance(one, TransferTime)
        assert all(type(v) is float for v in (one.seconds, one.low_seconds, one.high_seconds))
        ws = np.stack([window(50.0), window(500.0), window(5.0)])
        many = shipped.transfer_time(ws, [1e6, 1e6, 1e6], step_s=[1.0, 2.0, 0.5])
        for arr in (many.seconds, many.low_seconds, many.high_seconds):
            assert arr.dtype == np.float64 and arr.shape == (3,)
        assert many.seconds[1] < many.seconds[0] < many.seconds[2]
        same = shipped.transfer_time(ws, 1e6, step_s=1.0)
        assert same.seconds[0] == pytest.approx(many.seconds[0])
        with pytest.raises(ValueError, match="payload_bytes"):
            shipped.transfer_time(ws, [1.0, 2.0])
        with pytest.raises(ValueError, match="payload_bytes"):
            shipped.transfer_time(ws, -1)
        with pytest.raises(ValueError, match="step_s"):
            shipped.transfer_time(ws, 1.0, step_s=0.0)
        with pytest.raises(ValueError, match="window"):
            shipped.transfer_time(np.zeros((9, 4)), 1.0)

    def test_without_horizons_today_rule(self, no_horizons: Path) -> None:
        """A directory without horizons answers payload / next-step forecast,
        the interval's ends giving the time's."""
        p = Predictor.load(no_horizons)
        w = window([40.0, 42.0, 41.0, 39.0, 40.0, 43.0, 41.0, 40.0, 42.0, 41.0])
        fc = p.forecast(w)
        tt = p.transfer_time(w, 1e8)
        bits = 1e8 * 8 / 1e6
        assert tt.seconds == pytest.approx(bits / float(fc.bandwidth_mbps[0]), rel=1e-6)
        assert tt.low_seconds == pytest.approx(bits / float(fc.high_mbps[0]), rel=1e-6)
        assert tt.high_seconds == pytest.approx(bits / float(fc.low_mbps[0]), rel=1e-6)


class TestModelDirHorizons:
    """The horizon graph in the model directory contract."""

    def test_shipped_default_declares_horizons(self) -> None:
        """The embedded default ships the horizon graph, up to at least 120 s."""
        model = load_model(DEFAULT_MODEL_DIR)
        assert model.horizon is not None
        hz = model.manifest.horizons
        assert hz[0] <= 1.0 and hz[-1] >= 120.0

    def test_old_directory_loads_without(self, no_horizons: Path) -> None:
        """A directory without horizons loads; it has no horizon session."""
        model = load_model(no_horizons)
        assert model.horizon is None and model.manifest.horizons == ()
        with pytest.raises(ValueError, match="no horizons"):
            model.run_horizon(np.zeros((1, 10, 4), np.float32), np.ones(1, np.float32))

    def test_new_directory_runs_horizons(self, with_horizons: Path) -> None:
        """A directory with the graph gives [N, H] means in order."""
        model = load_model(with_horizons)
        w = np.stack([window(10.0), window(1000.0)])
        mean, low, high = model.run_horizon(w, np.ones(2, np.float32))
        assert mean.shape == (2, len(model.manifest.horizons))
        assert (low <= mean).all() and (mean <= high).all()

    @pytest.mark.parametrize(
        ("change", "message"),
        [  # regular expressions
            ({"horizons": [4.0, 2.0]}, "horizons: must be strictly increasing"),
            ({"horizons": [1.0, -2.0]}, "horizons: must be 1-64 numbers"),
            ({"horizons": [1.0, 2.0]}, "horizon output mean_mbps: expected shape"),
            ({"horizons": None}, "horizons: 'horizon' .* come together"),
        ],
    )
    def test_bad_horizons_refused(
        self, with_horizons: Path, tmp_path: Path, change: dict[str, object], message: str
    ) -> None:
        """Bad horizons, or a graph whose outputs do not match them, are refused
        with the field named."""
        d = Path(shutil.copytree(with_horizons, tmp_path / "m"))
        raw = json.loads((d / "manifest.json").read_text())
        for key, value in change.items():
            if value is None:
                del raw[key]
            else:
                raw[key] = value
        (d / "manifest.json").write_text(json.dumps(raw))
        with pytest.raises(ModelError, match=message):
            load_model(d)

    def test_tampered_horizon_graph_refused(self, with_horizons: Path, tmp_path: Path) -> None:
        """The horizon graph's sha256 is checked like the others'."""
        d = Path(shutil.copytree(with_horizons, tmp_path / "m"))
        data = bytearray((d / "horizon.onnx").read_bytes())
        data[-1] ^= 1
        (d / "horizon.onnx").write_bytes(bytes(data))
        with pytest.raises(ModelError, match=r"horizon\.onnx: sha256 mismatch"):
            load_model(d)
