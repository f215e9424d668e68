"""The torch forecaster as a numpy function: windows in, forecasts out.

One job: :func:`forecast_fn` wraps a
:class:`trainer.models.forecaster.Forecaster` as a :data:`ForecastFn`, the
shape every consumer of forecasts takes (the evaluators, the allocation
environment, the training report, export's parity check), whether the
forecasts come from torch, from onnxruntime or from a baseline. torch is
imported when a model is wrapped, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BATCH", "ForecastFn", "forecast_fn"]

F32 = npt.NDArray[np.float32]
# (raw windows [N, W, F]) -> (point, low, high), each [N] Mbit/s.
ForecastFn = Callable[[F32], tuple[F32, F32, F32]]
# Windows per forward pass: bounds the activations' memory on long traces.
BATCH = 8192


def forecast_fn(model: nn.Module, batch: int = BATCH) -> ForecastFn:
    """Wrap a torch forecaster as a :data:`ForecastFn`.

    Each call runs the model in eval mode without gradients, ``batch``
    windows per forward pass, and puts the model's mode back afterwards.

    Args:
        model: a forecaster whose forward maps ``[B, W, F]`` float32 raw
            windows to ``(point, low, high)``, each ``[B, 1]``.
        batch: windows per forward pass.
    """
    import torch

    def run(windows: F32) -> tuple[F32, F32, F32]:
        outs: list[list[F32]] = [[], [], []]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(windows), batch):
                    x = torch.from_numpy(np.ascontiguousarray(windows[i : i + batch], np.float32))
                    for k, y in enumerate(model(x)):
                        outs[k].append(y.reshape(-1).numpy().astype(np.float32))
        finally:
            model.train(was_training)
        point, low, high = (np.concatenate(o) if o else np.zeros(0, np.float32) for o in outs)
        return point, low, high

    return run
