"""The one torch-to-numpy forecaster wrapper (trainer/predict.py)."""

from __future__ import annotations

import numpy as np
import torch

from bwpredd.modeldir import smoke_windows
from trainer.models.forecaster import Forecaster, ForecasterConfig
from trainer.predict import forecast_fn


class TestForecastFn:
    def test_matches_the_model_in_eval_mode(self) -> None:
        """Point, low and high are the model's eval-mode outputs as float32 [N]."""
        torch.manual_seed(0)
        model = Forecaster(ForecasterConfig(residual=True)).eval()
        windows = smoke_windows(12, seed=4)
        point, low, high = forecast_fn(model)(windows)
        with torch.no_grad():
            want = [o[:, 0].numpy() for o in model(torch.from_numpy(windows))]
        for got, ref in zip((point, low, high), want, strict=True):
            assert got.dtype == np.float32 and got.shape == (12,)
            np.testing.assert_allclose(got, ref, rtol=1e-6)

    def test_batches_concatenate_in_order(self) -> None:
        """Windows split into forward passes of ``batch`` come back in order."""
        torch.manual_seed(1)
        model = Forecaster().eval()
        windows = smoke_windows(10, seed=2)
        whole = forecast_fn(model)(windows)
        split = forecast_fn(model, batch=3)(windows)
        for a, b in zip(whole, split, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
        assert all(x.shape == (0,) for x in forecast_fn(model)(windows[:0]))

    def test_runs_in_eval_mode_and_restores_the_mode(self) -> None:
        """A model in training mode is run without dropout (the same answer
        twice) and is left in training mode."""
        torch.manual_seed(2)
        model = Forecaster().train()
        windows = smoke_windows(6, seed=3)
        fn = forecast_fn(model)
        first, second = fn(windows), fn(windows)
        np.testing.assert_array_equal(first[0], second[0])
        assert model.training
