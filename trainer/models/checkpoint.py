"""Checkpoints that rebuild their model: weights, the config dataclass that
made them, and JSON-able metadata, in a dict ``torch.load(weights_only=True)``
reads without unpickling any class of ours."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["load", "save"]

M = TypeVar("M", bound=nn.Module)


def save(model: nn.Module, kind: str, path: str, **meta: object) -> None:
    """Save ``model`` (which has a dataclass ``cfg``) as a ``kind`` checkpoint.

    Args:
        model: the module; its ``cfg`` rebuilds it.
        kind: what the checkpoint holds ("forecaster", "qnet").
        path: where to write.
        meta: JSON-able extras (metrics, seed, state layout...).
    """
    cfg: Any = model.cfg
    torch.save(
        {"kind": kind, "config": asdict(cfg), "state_dict": model.state_dict(), **meta},
        path,
    )


def load(path: str, kind: str, build: Any) -> tuple[Any, dict[str, object]]:
    """Rebuild a model (in eval mode) from a ``kind`` checkpoint alone.

    Args:
        path: the checkpoint.
        kind: the kind it must be.
        build: ``(config_class, model_class)``.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt.get("kind") == kind, f"{path}: not a {kind} checkpoint"
    cfg_cls, model_cls = build
    # JSON-like round trip: tuples in the config come back as lists.
    cfg = cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})
    model = model_cls(cfg)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
