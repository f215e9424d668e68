"""bwpredd: per-peer bandwidth forecasting and allocation sidecar for the DWCP mesh."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Predictor"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from bwpredd.predictor import Predictor


def __getattr__(name: str) -> Any:
    # Lazy, so `import bwpredd.manifest` (export, trainer) does not load
    # onnxruntime.
    if name == "Predictor":
        from bwpredd.predictor import Predictor

        return Predictor
    raise AttributeError(name)
