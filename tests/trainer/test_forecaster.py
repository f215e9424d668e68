"""The forecaster model, its loss and sampling, and a short training run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import synthetic_windows, write_csv_traces
from trainer.models.forecaster import (
    Forecaster,
    ForecasterConfig,
    load_checkpoint,
    save_checkpoint,
)
from trainer.train_forecaster import (
    TraceBank,
    TrainConfig,
    calibrate_interval,
    forecaster_loss,
    train_forecaster,
)


@dataclass
class _Trace:
    source: str
    data: np.ndarray
    name: str = "t"
    group: str = "t"


def _windows(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    """Synthetic windows whose bandwidth walks around ``scale`` Mbit/s."""
    return torch.from_numpy(synthetic_windows(n, seed, mbps=(scale, scale)))


def _ar_trace(source: str, n: int, seed: int, base: float) -> _Trace:
    """A mean-reverting log-AR(1) bandwidth series: learnable beyond last value."""
    rng = np.random.default_rng(seed)
    a = np.zeros(n)
    for t in range(1, n):
        a[t] = 0.5 * a[t - 1] + rng.normal(0, 0.3)
    data = np.zeros((n, 4), dtype=np.float32)
    data[:, 0], data[:, 1], data[:, 3] = 50.0, base * np.exp(a), 1.0
    return _Trace(source, data, name=f"{source}{seed}", group=f"{source}{seed}")


class TestForecasterModel:
    @pytest.mark.parametrize("residual", [False, True])
    def test_raw_units_in_three_columns_out(self, residual: bool) -> None:
        """Raw [N,10,4] windows give point, low and high, each [N,1], low <= point <= high."""
        model = Forecaster(ForecasterConfig(residual=residual)).eval()
        for scale in (0.1, 100.0, 10_000.0):
            with torch.no_grad():
                point, low, high = model(_windows(16, scale))
            for out in (point, low, high):
                assert out.shape == (16, 1)
                assert torch.isfinite(out).all()
            assert (low <= point).all() and (point <= high).all()
            assert (low >= 0).all()

    def test_scale_free(self) -> None:
        """Multiplying a window's bandwidth by 1000 multiplies every forecast by 1000."""
        model = Forecaster(ForecasterConfig(residual=True)).eval()
        x = _windows(8, 5.0)
        big = x.clone()
        big[:, :, 1] *= 1000
        with torch.no_grad():
            small_out, big_out = model(x), model(big)
        for s, b in zip(small_out, big_out, strict=True):
            torch.testing.assert_close(b, s * 1000, rtol=1e-4, atol=1e-4)

    def test_outage_window_stays_finite(self) -> None:
        """A window of zeros (an outage) gives finite, non-negative forecasts."""
        model = Forecaster().eval()
        x = _windows(4, 1.0)
        x[:, :, 1] = 0
        with torch.no_grad():
            outs = model(x)
        assert all(torch.isfinite(o).all() and (o >= 0).all() for o in outs)

    def test_checkpoint_round_trip(self, tmp_path: Path) -> None:
        """A checkpoint rebuilds the same model (weights_only load) with its metadata."""
        model = Forecaster(ForecasterConfig(residual=True)).eval()
        path = tmp_path / "f.pt"
        save_checkpoint(model, str(path), seed=3, metrics={"nmae": 0.2})
        loaded, ckpt = load_checkpoint(str(path))
        x = _windows(8, 20.0)
        with torch.no_grad():
            for a, b in zip(model(x), loaded(x), strict=True):
                torch.testing.assert_close(a, b)
        assert ckpt["seed"] == 3 and loaded.cfg.residual

    def test_merge_averages_the_members(self) -> None:
        """A merged forecaster's median is the mean of its members' medians (in
        relative log space) and its interval half-widths the mean of theirs; it
        survives a checkpoint round trip."""
        torch.manual_seed(0)
        a, b = (Forecaster(ForecasterConfig(residual=True)).eval() for _ in range(2))
        merged = Forecaster.merge([a, b])
        assert merged.cfg.members == 2 and not merged.training
        x = _windows(8, 30.0)
        with torch.no_grad():
            qa, qb, qm = a.forward_rel(x), b.forward_rel(x), merged.forward_rel(x)
        torch.testing.assert_close(qm, (qa + qb) / 2)
        assert not torch.allclose(qa, qb)

    def test_merge_refuses_different_architectures(self) -> None:
        """Members must share their architecture."""
        with pytest.raises(ValueError, match="architectures differ"):
            Forecaster.merge([Forecaster(), Forecaster(ForecasterConfig(residual=True))])

    def test_merged_checkpoint_round_trip(self, tmp_path: Path) -> None:
        """A merged forecaster's checkpoint rebuilds both members."""
        merged = Forecaster.merge([Forecaster().eval(), Forecaster().eval()])
        save_checkpoint(merged, str(tmp_path / "m.pt"))
        loaded, _ = load_checkpoint(str(tmp_path / "m.pt"))
        x = _windows(4, 3.0)
        with torch.no_grad():
            torch.testing.assert_close(loaded.forward_rel(x), merged.forward_rel(x))


class TestLossAndSampling:
    def test_loss_is_scaled_absolute_error_plus_pinball(self) -> None:
        """Point loss is |error| / trace mean; quantile heads add pinball on that scale."""
        cfg = ForecasterConfig()
        q = torch.tensor([[8.0, 10.0, 12.0]])
        y = torch.tensor([14.0])
        scale = torch.tensor([2.0])
        loss, point = forecaster_loss(q, y, scale, cfg)
        # e = (14 - q) / 2 = [3, 2, 1]: point 2; low 0.1*3 = 0.3; high 0.9*1 = 0.9
        assert point.item() == pytest.approx(2.0)
        assert loss.item() == pytest.approx(2.0 + 0.3 + 0.9)

    def test_every_source_weighs_the_same(self) -> None:
        """Sampling picks sources uniformly, however many traces and steps each has."""
        traces = [_ar_trace("big", 5000, 0, 1.0)] + [
            _ar_trace("many", 30, k, 1.0) for k in range(20)
        ]
        bank = TraceBank(traces, {})
        rng = np.random.default_rng(0)
        _, _, scale = bank.sample(rng, 4000)
        # trace scale identifies the source: the one "big" trace vs the rest
        share_big = float((scale == bank.scale[0]).float().mean())
        assert 0.45 < share_big < 0.55

    def test_source_weights_apply(self) -> None:
        """A source weight of 0 removes that source from the batches."""
        traces = [_ar_trace("a", 100, 0, 1.0), _ar_trace("b", 100, 1, 1000.0)]
        bank = TraceBank(traces, {"b": 0.0})
        _, y, _ = bank.sample(np.random.default_rng(0), 500)
        assert float(y.max()) < 100


class TestTraining:
    def test_short_run_lowers_validation_loss(self) -> None:
        """A few hundred steps bring the validation loss below its starting value."""
        train = [_ar_trace(s, 300, k, b) for s, b in (("x", 1.0), ("y", 500.0)) for k in range(4)]
        val = [
            _ar_trace(s, 200, 100 + k, b) for s, b in (("x", 2.0), ("y", 50.0)) for k in range(2)
        ]
        cfg = TrainConfig(
            seed=0,
            max_epochs=2,
            steps_per_epoch=40,
            val_windows_per_trace=32,
            threads=1,
            ema_decay=0.0,  # an EMA over 80 steps would barely leave the initial weights
        )
        model, hist = train_forecaster(train, val, cfg, ForecasterConfig(), progress=False)
        assert hist.best_val_loss < hist.initial_val_loss
        assert hist.best_epoch >= 1
        assert not model.training

    def test_deterministic_for_a_seed(self) -> None:
        """Two runs with the same seed end with identical weights."""
        train = [_ar_trace("x", 200, k, 1.0) for k in range(3)]
        val = [_ar_trace("x", 100, 9, 1.0)]
        cfg = TrainConfig(
            seed=7, max_epochs=1, steps_per_epoch=5, val_windows_per_trace=8, threads=1
        )
        a, _ = train_forecaster(train, val, cfg, ForecasterConfig(residual=True), progress=False)
        b, _ = train_forecaster(train, val, cfg, ForecasterConfig(residual=True), progress=False)
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(pa, pb), name


class TestCalibration:
    @pytest.mark.parametrize("target", [0.5, 0.8])
    def test_interval_covers_the_target_share(self, target: float) -> None:
        """After calibration the interval covers the target share of actuals on those traces."""
        from trainer.data.windows import make_windows

        traces = [_ar_trace("a", 400, k, 3.0) for k in range(3)]
        model = Forecaster(ForecasterConfig(residual=True)).eval()
        scale = calibrate_interval(model, traces, target=target)
        assert scale > 0 and model.cfg.interval_scale == scale
        w = make_windows(traces)  # type: ignore[arg-type]
        with torch.no_grad():
            _, low, high = model(torch.from_numpy(w.x))
        y = torch.from_numpy(w.y)
        covered = ((y >= low[:, 0]) & (y <= high[:, 0])).float().mean().item()
        assert covered == pytest.approx(target, abs=0.01)


class TestTrainCommand:
    def test_quick_run_writes_checkpoint_split_and_reports(self, tmp_path: Path) -> None:
        """train --quick on a generic-CSV dir writes the checkpoint, split.json and reports."""
        import json

        from trainer.__main__ import main

        root = write_csv_traces(tmp_path / "traces", length=60)
        out = tmp_path / "run"
        code = main(["train", "--traces", str(root), "--seed", "0", "--out", str(out),
                     "--quick", "--skip-agent", "--quiet"])  # fmt: skip
        assert code == 0
        _, ckpt = load_checkpoint(str(out / "forecaster.pt"))
        assert ckpt["seed"] == 0
        split = json.loads((out / "split.json").read_text())
        names = [r["name"] for part in split["splits"].values() for r in part]
        assert len(names) == len(set(names))  # no file in two splits
        report = json.loads((out / "reports" / "training_report.json").read_text())
        for key in ("mse", "mae", "mape", "accuracy"):
            assert key in report["lstm_metrics"]
        assert {"lab", "home"} <= set(report["test"]["per_source"])
        assert "training_date" in report and "model_config" in report
        assert (out / "reports" / "forecaster.md").read_text().startswith("# Forecaster")
        assert (out / "reports" / "learning_curve.png").stat().st_size > 0
