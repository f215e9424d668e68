"""The horizon forecaster: a small quantile MLP, and its config.

It answers, per window, the 10th, 50th and 90th percentiles of the **mean
bandwidth over the next h seconds** for each of a fixed set of horizons
(:data:`HORIZONS`, 0.5 s to 512 s, doubling), which is what a transfer of a
given size sees over its duration (:mod:`bwpredd.transfer` turns them into
times).

Raw units in, Mbit/s out; the normalisation is inside the module (and so
inside the ONNX graph): bandwidth floored at 1 kbit/s, in log space relative
to the window's geometric mean ``g``, so one network serves 3G phones and
datacenter links. Inputs of the MLP: the 10 relative log bandwidths, the
log of the step between samples (seconds: the same 10 samples span 5 s or 50
s; clamped to ``step_range``, the steps the traces have, so a window of
samples pushed milliseconds apart reads as one at 0.5 s), and ``ln g / 10``
(the link's level: with it the validation error at 5 / 20 / 60 s was 0.933 /
0.853 / 0.895 of the best constant rate's, without 0.970 / 0.878 / 0.910).
Outputs: per horizon, the median of ``ln(mean / g)`` and two softplus
offsets below and above it (so the quantiles never cross), plus per-horizon
log shifts fitted on the validation split after training (the conformal
widening, a buffer: it travels with the weights and into the graph).

Chosen on the validation split (error at d = 5 / 20 / 60 s over the best
constant rate's, eval-transfer's protocol): 2 x 64 GELU, 4,000 steps: 0.964
/ 0.912 / 0.887; 2 x 128, early-stopped at 2,750 of 8,000 steps: 0.933 /
0.853 / 0.895 (the default); the same on 5 x more windows per trace: 0.929 /
0.857 / 0.894; two such networks averaged: 0.927 / 0.885 / 0.872. None was
clearly better than the single 2 x 128 network, so it ships alone. Trained
with steady links added (:func:`trainer.train_transfer.steady_traces`): 0.958
/ 0.869 / 0.878, and a steady window then gives payload / rate within 5% at
1-300 s for 100 Mbit/s-10 Gbit/s links at 0.5-5 s steps (1.15x without, at
0.5 s steps).

Tried after shipping, one seed each unless said, on the validation split (the
shipped network, seed 0: 0.958 / 0.869 / 0.878). The seed alone moves 20 and
60 s by about 0.03 (seeds 1, 2: 0.936 / 0.902 / 0.893, 0.958 / 0.864 /
0.891); the three averaged: 0.932 / 0.885 / 0.891. Without the level input
0.963 / 0.884 / 0.926. The pinball loss weighted 2x at 8-64 s: 0.939 / 0.897
/ 0.875. The constant rates as inputs (log EWMA and arithmetic mean over
``g``, mean step-to-step log change) and a linear skip from inputs to the
head: 0.955 / 0.890 / 0.889. The next-step forecaster's point and interval
as inputs: 0.942 / 0.883 / 0.887. Bandwidth levels shifted at random (ln
+-1) in training: 0.943 / 0.894 / 0.892. 3 x 256: 0.919 / 0.869 / 0.890.
Every trace of a source weighing the same (``--trace-balance``), 1,200
windows per trace, 16,000 steps: seeds 0 and 1 0.909 / 0.858 / 0.892 and
0.915 / 0.875 / 0.892 (better at 5 s, not at 60 s). None beats the shipped
network at both 20 and 60 s.

Predicting the time directly instead (Fugu's way: the 10th, 50th and 90th
percentiles of ``ln(time g / B)`` for a payload of B Mbit, with ``ln(B / g)``
an input beside the same features; payloads drawn per window for durations
0.5-150 s at the last value; same 2 x 128 network, sources weighted alike,
conformal shifts per payload bin), in the same session as the shipped
network's 0.956 / 0.866 / 0.877: 0.966 / 0.909 / 0.923. The curves of mean
bandwidth give the time's quantiles exactly (see :mod:`bwpredd.transfer`)
and share what they learn across horizons; the direct target did not help.
Longer history does not look like the way either: constant rates over the
last 20, 40 or 80 samples instead of 10 score 0.293 / 0.290 / 0.357 at 20 s
(10: 0.286) and 0.295 / 0.294 / 0.333 at 60 s (10: 0.299) on validation.
Nor does shrinking the shipped network's times toward a constant rate's
(geometric blend, the interval moved with the point), which generalises
better where a network overfits: on validation, with weight 0.9 / 0.8 / 0.7
on the network, toward EWMA 0.949 / 0.946 / 0.950 at 5 s, 0.878 / 0.905 /
0.913 at 20 s, 0.894 / 0.906 / 0.903 at 60 s; toward the window mean 0.969
/ 0.992 / 1.007, 0.907 / 0.933 / 0.962, 0.883 / 0.891 / 0.900 (the network
alone 0.958 / 0.869 / 0.878).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from bwpredd.schema import BW, WINDOW

__all__ = ["HORIZONS", "HorizonConfig", "HorizonNet", "load_checkpoint", "save_checkpoint"]

HORIZONS: tuple[float, ...] = tuple(0.5 * 2.0**k for k in range(11))  # 0.5 .. 512 s
_BW = BW


@dataclass
class HorizonConfig:
    """Shape of the network; ``quantiles`` are (low, median, high)."""

    horizons: tuple[float, ...] = HORIZONS
    hidden: int = 128
    layers: int = 2
    floor_mbps: float = 1e-3
    step_range: tuple[float, float] = (0.5, 5.0)
    level_feature: bool = True
    quantiles: tuple[float, float, float] = (0.1, 0.5, 0.9)
    members: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class _Member(nn.Module):
    """One MLP: features -> (median, low offset, high offset) per horizon."""

    def __init__(self, cfg: HorizonConfig, n_in: int) -> None:
        super().__init__()
        h = len(cfg.horizons)
        layers: list[nn.Module] = []
        width = n_in
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU()]
            width = cfg.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 3 * h)
        with torch.no_grad():
            self.head.bias.zero_()
            self.head.bias[h:] = 0.5  # softplus offsets start near 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out


class HorizonNet(nn.Module):
    """``(window [N, WINDOW, WIDTH], step_s [N, 1]) -> (mean, low, high) [N, H]`` Mbit/s.

    With ``members`` > 1 it holds that many MLPs (trained apart, seeds
    seed, seed+1, ...: :meth:`merge`) and averages their log quantiles.
    """

    def __init__(self, cfg: HorizonConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_in = WINDOW + 1 + (1 if cfg.level_feature else 0)
        self.members = nn.ModuleList(_Member(cfg, n_in) for _ in range(cfg.members))
        # Conformal shifts (log space) per (low, median, high) x horizon.
        self.register_buffer("shift", torch.zeros(3, len(cfg.horizons)))

    @classmethod
    def merge(cls, nets: list[HorizonNet]) -> HorizonNet:
        """One network averaging ``nets`` (same config, one member each);
        the shifts start at zero (calibrate after merging)."""
        cfg = replace(nets[0].cfg, members=len(nets))
        out = cls(cfg)
        for dst, src in zip(out.members, nets, strict=True):
            dst.load_state_dict(src.members[0].state_dict())
        out.eval()
        return out

    def features(self, window: torch.Tensor, step_s: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The MLP's inputs and the log reference level ``ln g`` ``[N, 1]``."""
        logbw = torch.log(torch.clamp(window[:, :, _BW], min=self.cfg.floor_mbps))
        ref = logbw.mean(dim=1, keepdim=True)
        lo, hi = self.cfg.step_range
        parts = [logbw - ref, torch.log(torch.clamp(step_s, min=lo, max=hi))]
        if self.cfg.level_feature:
            parts.append(ref / 10.0)
        return torch.cat(parts, dim=1), ref

    def log_quantiles(
        self, window: torch.Tensor, step_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ref, median, low, high)``: quantiles of ``ln(mean / g)`` ``[N, H]``
        before the shifts (averaged over members), and ``ln g`` ``[N, 1]``."""
        x, ref = self.features(window, step_s)
        h = len(self.cfg.horizons)
        mids, lows, highs = [], [], []
        for member in self.members:
            out = member(x)
            mid = out[:, :h]
            mids.append(mid)
            lows.append(mid - nn.functional.softplus(out[:, h : 2 * h]))
            highs.append(mid + nn.functional.softplus(out[:, 2 * h :]))
        k = float(len(mids))
        return ref, sum(mids) / k, sum(lows) / k, sum(highs) / k

    def forward(
        self, window: torch.Tensor, step_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ref, mid, low, high = self.log_quantiles(window, step_s)
        shift: torch.Tensor = self.shift  # type: ignore[assignment]
        mid = mid + shift[1]
        low = torch.minimum(low + shift[0], mid)
        high = torch.maximum(high + shift[2], mid)
        return torch.exp(ref + mid), torch.exp(ref + low), torch.exp(ref + high)


def save_checkpoint(model: HorizonNet, path: str, **meta: Any) -> None:
    """Weights, config and metadata in one file (plain types only)."""
    torch.save(
        {"kind": "horizon", "config": asdict(model.cfg), "state": model.state_dict(), **meta}, path
    )


def load_checkpoint(path: str) -> tuple[HorizonNet, dict[str, Any]]:
    """Rebuild a :class:`HorizonNet` from :func:`save_checkpoint`'s file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    raw = dict(ckpt["config"])
    raw["horizons"] = tuple(raw["horizons"])
    raw["quantiles"] = tuple(raw["quantiles"])
    raw["step_range"] = tuple(raw["step_range"])
    model = HorizonNet(HorizonConfig(**raw))
    model.load_state_dict(ckpt["state"])
    model.eval()
    return model, ckpt
