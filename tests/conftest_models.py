"""Test helper: build a real, small model directory through the export code.

Not a conftest: import it where needed with
``from tests.conftest_models import make_model_dir``. The models are freshly
initialised (seeded, untrained) real architectures, exported, checked
against torch and published exactly as ``python -m export`` does, so the
daemon's tests load genuine ONNX files (reload, corruption, guardrails).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.harness import synthetic_windows
from bwpredd.state import STATE_LAYOUT
from export import export_model_dir
from trainer.models.forecaster import Forecaster, ForecasterConfig
from trainer.models.horizon import HorizonConfig, HorizonNet
from trainer.models.qnet import QNetConfig, QNetwork

__all__ = ["ScaledForecaster", "make_model_dir"]


class ScaledForecaster(nn.Module):
    """A forecaster whose point and interval are multiplied by ``factor``
    inside the graph: a deliberately wrong model for guardrail tests."""

    def __init__(self, inner: Forecaster, factor: float) -> None:
        super().__init__()
        self.inner = inner
        self.cfg = inner.cfg
        self.factor = float(factor)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        point, low, high = self.inner(window)
        return point * self.factor, low * self.factor, high * self.factor


def make_model_dir(
    dest: Path,
    *,
    seed: int = 0,
    version: str = "test-1",
    forecast_scale: float | None = None,
    horizon: bool = False,
) -> Path:
    """Build a real model directory at ``dest`` from seeded, untrained models.

    An existing ``dest`` is replaced atomically (as ``--force`` does), so a
    test can publish a new version over the directory a daemon is serving.

    Args:
        dest: the model directory to create or replace.
        seed: seeds the weights (different seeds give different files).
        version: the manifest's ``version``.
        forecast_scale: when given, multiply the point forecast and the
            interval by this factor inside the exported graph.
        horizon: also ship a (seeded, untrained) horizon graph with the
            default horizons declared.

    Returns:
        ``dest``.
    """
    torch.manual_seed(seed)
    forecaster: nn.Module = Forecaster(ForecasterConfig())
    allocator = QNetwork(QNetConfig(state_size=len(STATE_LAYOUT)))
    if forecast_scale is not None:
        forecaster = ScaledForecaster(forecaster, forecast_scale)  # type: ignore[arg-type]
    windows = synthetic_windows(256, seed)
    export_model_dir(
        forecaster,
        allocator,
        Path(dest),
        windows=windows,
        windows_source=f"synthetic (seed {seed}, test helper)",
        version=version,
        evaluation={"note": "untrained test model"},
        training_data={"note": "none: freshly initialised"},
        provenance={"helper": "tests.conftest_models.make_model_dir", "seed": seed},
        force=True,
        timing=False,
        log=lambda _line: None,
        horizon=HorizonNet(HorizonConfig()) if horizon else None,
    )
    return Path(dest)


if __name__ == "__main__":
    # The Go client's tests make their model directory here:
    # python -m tests.conftest_models DEST
    import sys

    print(make_model_dir(Path(sys.argv[1])))
