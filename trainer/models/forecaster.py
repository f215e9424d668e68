"""The bandwidth forecaster: the origin's stacked LSTM with an interval head.

The model takes raw windows ``[N, WINDOW, WIDTH]`` (features as
:mod:`bwpredd.schema` orders them) and does its own normalisation, so the exported
ONNX graph is fed raw units and no statistics file can drift from it.
Bandwidth spans four orders of magnitude, so each window is put in log scale
relative to its own mean: ``r = log((bw + eps m) / m)`` with ``m`` the window
mean and ``eps = 0.01`` (which keeps outages finite). The heads predict the
next step's 10th, 50th and 90th percentiles of ``r``; the inverse transform is
monotone, so they map exactly to percentiles in Mbit/s. The median is the
point forecast (it minimises absolute error). With ``residual`` the median is
the newest sample's ``r`` plus the head's correction.

A forecaster may hold several independently trained networks ("members",
:meth:`Forecaster.merge`): it averages their median corrections and their
interval half-widths, so one graph serves the ensemble.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bwpredd.schema import BW, LAT, LOSS, REL, WIDTH
from trainer.members import merge_members
from trainer.models import checkpoint

__all__ = ["Forecaster", "ForecasterConfig", "load_checkpoint", "save_checkpoint"]


@dataclass
class ForecasterConfig:
    """Architecture of :class:`Forecaster` (stored in every checkpoint)."""

    n_features: int = WIDTH
    lstm_sizes: tuple[int, int, int] = (128, 64, 32)
    lstm_dropout: float = 0.2
    dense_sizes: tuple[int, int] = (16, 8)
    dense_dropout: float = 0.3
    rel_eps: float = 0.01
    low_quantile: float = 0.1
    high_quantile: float = 0.9
    # Predict the median as the newest sample's relative log value plus a
    # learned correction, so an untrained network starts as "last value"
    # (the strongest simple baseline) instead of as noise. False keeps the
    # origin's plain head (and old checkpoints, which lack the key).
    residual: bool = False
    # Multiplies both quantile heads' distance from the median, set after
    # training so the nominal 80% interval covers 80% of validation actuals.
    interval_scale: float = 1.0
    # Networks whose outputs are averaged (each trained alone; see merge).
    members: int = 1


class _SeqBatchNorm(nn.Module):
    """BatchNorm1d over the channel axis of a ``[N, T, C]`` sequence."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.bn(x.transpose(1, 2))
        return y.transpose(1, 2)


class _Member(nn.Module):
    """One network: LSTM 128 -> 64 -> 32 (each + dropout 0.2 + batch norm),
    Dense 16 ReLU + dropout 0.3, Dense 8 ReLU, Dense 3."""

    width_cols: torch.Tensor

    def __init__(self, cfg: ForecasterConfig) -> None:
        super().__init__()
        sizes = (cfg.n_features, *cfg.lstm_sizes)
        self.lstms = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(cfg.lstm_sizes))
        )
        self.drops = nn.ModuleList(nn.Dropout(cfg.lstm_dropout) for _ in cfg.lstm_sizes)
        self.norms = nn.ModuleList(_SeqBatchNorm(s) for s in cfg.lstm_sizes)
        d1, d2 = cfg.dense_sizes
        # Which of the head's outputs are widths (softplus), not the median.
        self.register_buffer("width_cols", torch.tensor([True, False, True]), persistent=False)
        self.head = nn.Sequential(
            nn.Linear(cfg.lstm_sizes[-1], d1),
            nn.ReLU(),
            nn.Dropout(cfg.dense_dropout),
            nn.Linear(d1, d2),
            nn.ReLU(),
            nn.Linear(d2, 3),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``[N, 3]``: the low half-width, the median and the high half-width
        (both widths >= 0), before the residual and the interval scale."""
        h = feats
        for lstm, drop, norm in zip(self.lstms, self.drops, self.norms, strict=True):
            h, _ = lstm(h)
            h = norm(drop(h))
        out = self.head(h[:, -1, :])
        # Softplus on the two widths, the median as it is: one elementwise
        # selection, which the exported graph runs as two nodes, not twelve.
        return torch.where(self.width_cols, nn.functional.softplus(out), out)


class Forecaster(nn.Module):
    """The origin's stacked LSTM with a 3-quantile head (:class:`_Member`),
    or the average of ``cfg.members`` of them.

    ``forward(window)`` returns ``(bandwidth_mbps, low_mbps, high_mbps)``, each
    ``[N, 1]`` in Mbit/s; :meth:`forward_rel` returns the quantiles of the
    relative log target, which is what training works on.
    """

    def __init__(self, cfg: ForecasterConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ForecasterConfig()
        self.members = nn.ModuleList(_Member(cfg) for _ in range(cfg.members))

    @classmethod
    def merge(cls, models: Sequence[Forecaster]) -> Forecaster:
        """One forecaster averaging the members of ``models``, which must
        share their architecture. Its interval scale is 1: calibrate it.
        """
        return merge_members(cls, models, interval_scale=1.0)

    def scale(self, window: torch.Tensor) -> torch.Tensor:
        """The window's mean bandwidth ``m`` ``[N, 1]`` (floored at 1 kbit/s)."""
        return window[:, :, BW].clamp(min=0).mean(dim=1, keepdim=True).clamp(min=1e-3)

    def features(self, window: torch.Tensor) -> torch.Tensor:
        """Raw window -> the scale-free inputs of the LSTM stack."""
        m = self.scale(window)
        bw = window[:, :, BW].clamp(min=0)
        rel = torch.log((bw + self.cfg.rel_eps * m) / m)
        lat = torch.log1p(window[:, :, LAT].clamp(min=0)) / 5.0
        loss = window[:, :, LOSS].clamp(0, 1) * 10.0
        unrel = (1.0 - window[:, :, REL].clamp(0, 1)) * 10.0
        return torch.stack([rel, lat, loss, unrel], dim=2)

    def forward_rel(self, window: torch.Tensor) -> torch.Tensor:
        """Quantiles ``[N, 3]`` (low, median, high) of the relative log target."""
        feats = self.features(window)
        outs = [member(feats) for member in self.members]
        out = outs[0] if len(outs) == 1 else sum(outs[1:], outs[0]) / len(outs)
        mid = out[:, 1:2]
        if self.cfg.residual:
            mid = mid + feats[:, -1, 0:1]
        k = self.cfg.interval_scale
        return torch.cat([mid - k * out[:, 0:1], mid, mid + k * out[:, 2:3]], dim=1)

    def to_mbps(self, rel: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Invert the relative log transform: ``m exp(r) - eps m``, >= 0."""
        m = self.scale(window)
        return (m * torch.exp(rel) - self.cfg.rel_eps * m).clamp(min=0)

    def target_rel(self, target_mbps: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """The relative log transform of a target bandwidth ``[N]`` -> ``[N, 1]``."""
        m = self.scale(window)
        y = target_mbps.reshape(-1, 1).clamp(min=0)
        return torch.log((y + self.cfg.rel_eps * m) / m)

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mbps = self.to_mbps(self.forward_rel(window), window)
        return mbps[:, 1:2], mbps[:, 0:1], mbps[:, 2:3]


def save_checkpoint(model: Forecaster, path: str, **meta: object) -> None:
    """Save weights with the config that rebuilds them, plus JSON-able ``meta``
    (metrics, training data summary, seed). Loadable with ``weights_only=True``.
    """
    checkpoint.save(model, "forecaster", path, **meta)


def load_checkpoint(path: str) -> tuple[Forecaster, dict[str, object]]:
    """Rebuild a :class:`Forecaster` (in eval mode) from its checkpoint alone."""
    model, ckpt = checkpoint.load(path, "forecaster", (ForecasterConfig, Forecaster))
    return model, ckpt
