"""The allocation agent's Q-network: the origin's architecture, with the
state normalisation inside the module so the exported graph takes raw states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.models import checkpoint

__all__ = ["QNetConfig", "QNetwork", "load_checkpoint", "save_checkpoint"]


@dataclass
class QNetConfig:
    """Architecture of :class:`QNetwork` (stored in every checkpoint)."""

    state_size: int
    n_actions: int = 10
    hidden: tuple[int, int, int] = (128, 64, 32)
    dropout: float = 0.3


class QNetwork(nn.Module):
    """Dense 128 ReLU + batch norm + dropout 0.3, Dense 64 ReLU + batch norm +
    dropout 0.3, Dense 32 ReLU + batch norm, Dense 10 (one Q-value per level).

    ``state_mean`` and ``state_std`` are buffers: set them from training
    states with :meth:`set_normalisation` and they travel with the weights.
    """

    def __init__(self, cfg: QNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h1, h2, h3 = cfg.hidden
        self.register_buffer("state_mean", torch.zeros(cfg.state_size))
        self.register_buffer("state_std", torch.ones(cfg.state_size))
        self.net = nn.Sequential(
            nn.Linear(cfg.state_size, h1),
            nn.ReLU(),
            nn.BatchNorm1d(h1),
            nn.Dropout(cfg.dropout),
            nn.Linear(h1, h2),
            nn.ReLU(),
            nn.BatchNorm1d(h2),
            nn.Dropout(cfg.dropout),
            nn.Linear(h2, h3),
            nn.ReLU(),
            nn.BatchNorm1d(h3),
            nn.Linear(h3, cfg.n_actions),
        )

    @torch.no_grad()
    def set_normalisation(self, states: torch.Tensor) -> None:
        """Standardise inputs by the mean and std of ``states`` ``[M, S]``."""
        self.state_mean.copy_(states.mean(dim=0))
        self.state_std.copy_(states.std(dim=0).clamp(min=1e-3))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net((state - self.state_mean) / self.state_std)


def save_checkpoint(model: QNetwork, path: str, **meta: object) -> None:
    """Save weights with the config that rebuilds them, plus JSON-able ``meta``
    (state layout, metrics, seed). Loadable with ``weights_only=True``.
    """
    checkpoint.save(model, "qnet", path, **meta)


def load_checkpoint(path: str) -> tuple[QNetwork, dict[str, object]]:
    """Rebuild a :class:`QNetwork` (in eval mode) from its checkpoint alone."""
    model, ckpt = checkpoint.load(path, "qnet", (QNetConfig, QNetwork))
    return model, ckpt
