"""Normalised MAE, defined once for the daemon, ``bwpredctl replay`` and the trainer.

One job: :func:`nmae`. A forecast's error in Mbit/s says little across links
that span four orders of magnitude, so every accuracy figure of the project
(the daemon's live scores and guardrail metrics, ``bwpredctl replay``'s
table, the trainer's evaluation and reports) divides a series' mean absolute
error by its mean actual bandwidth, and averages series so that each weighs
the same.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["nmae"]


def nmae(abs_err: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Normalised mean absolute error over one or several series (traces,
    peers), each weighing the same.

    A series' normalised MAE is its MAE divided by its mean actual, that is
    ``sum |error| / sum actual``; the result is its mean over the series whose
    actual is above 0 (a series of zeros has no scale to normalise by).

    Args:
        abs_err: per series, the sum of ``|forecast - actual|`` (or its mean):
            one value per series, or a scalar for one series.
        actual: per series, the sum of the actual values (or their mean, with
            the same count as ``abs_err``), in the same order.

    Returns:
        The mean normalised MAE, or NaN when no series has a scale.
    """
    num = np.asarray(abs_err, dtype=np.float64)
    den = np.asarray(actual, dtype=np.float64)
    ok = den > 0
    if not ok.any():
        return float("nan")
    return float(np.mean(num[ok] / den[ok]))
