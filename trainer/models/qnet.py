"""The allocation agent's Q-network: the origin's architecture, with the
state normalisation inside the module so the exported graph takes raw states.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.members import merge_members
from trainer.models import checkpoint

__all__ = ["QNetConfig", "QNetwork", "load_checkpoint", "save_checkpoint"]


@dataclass
class QNetConfig:
    """Architecture of :class:`QNetwork` (stored in every checkpoint)."""

    state_size: int
    n_actions: int = 10
    hidden: tuple[int, int, int] = (128, 64, 32)
    dropout: float = 0.3
    # Networks whose Q-values are averaged (each trained alone; see merge).
    members: int = 1


class _Member(nn.Module):
    """Dense 128 ReLU + batch norm + dropout 0.3, Dense 64 ReLU + batch norm +
    dropout 0.3, Dense 32 ReLU + batch norm, Dense 10, behind its own input
    standardisation (``state_mean``, ``state_std`` buffers)."""

    state_mean: torch.Tensor
    state_std: torch.Tensor

    def __init__(self, cfg: QNetConfig) -> None:
        super().__init__()
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

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        q: torch.Tensor = self.net((state - self.state_mean) / self.state_std)
        return q


class QNetwork(nn.Module):
    """The origin's Q-network (:class:`_Member`: one Q-value per level), or
    the average of ``cfg.members`` of them.

    The input standardisation is inside (buffers): set it from training
    states with :meth:`set_normalisation` and it travels with the weights.
    """

    def __init__(self, cfg: QNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(_Member(cfg) for _ in range(cfg.members))

    @classmethod
    def merge(cls, models: Sequence[QNetwork]) -> QNetwork:
        """One network averaging the Q-values of the members of ``models``,
        which must share their architecture."""
        return merge_members(cls, models)

    @torch.no_grad()
    def set_normalisation(self, states: torch.Tensor) -> None:
        """Standardise inputs by the mean and std of ``states`` ``[M, S]``."""
        for member in self.members:
            assert isinstance(member, _Member)
            member.state_mean.copy_(states.mean(dim=0))
            member.state_std.copy_(states.std(dim=0).clamp(min=1e-3))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        qs = [member(state) for member in self.members]
        return qs[0] if len(qs) == 1 else torch.stack(qs).mean(dim=0)


def save_checkpoint(model: QNetwork, path: str, **meta: object) -> None:
    """Save weights with the config that rebuilds them, plus JSON-able ``meta``
    (state layout, metrics, seed). Loadable with ``weights_only=True``.
    """
    checkpoint.save(model, "qnet", path, **meta)


def load_checkpoint(path: str) -> tuple[QNetwork, dict[str, object]]:
    """Rebuild a :class:`QNetwork` (in eval mode) from its checkpoint alone."""
    model, ckpt = checkpoint.load(path, "qnet", (QNetConfig, QNetwork))
    return model, ckpt
