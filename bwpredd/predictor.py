"""The in-process Python API: the daemon's Engine without the daemon.

>>> from bwpredd import Predictor
>>> p = Predictor.load()            # the embedded default model
>>> p.predict_bandwidth(window)     # one [10, 4] window or a batch [N, 10, 4], raw units
>>> p.transfer_time(window, 8 << 30, step_s=1.0).seconds   # 8 GiB over that link
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bwpredd.engine import Engine
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.schema import WIDTH, WINDOW
from bwpredd.state import DEFAULT_STEP_S
from bwpredd.state import allocation_percent as _allocation_percent
from bwpredd.transfer import TransferTime, bits_of, next_step_seconds

__all__ = ["Forecast", "Predictor", "TransferTime"]

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Forecast:
    """Forecasts for a batch (arrays ``[N]``, Mbit/s); ``source`` holds
    :class:`bwpredd.engine.Source` values."""

    bandwidth_mbps: F32
    low_mbps: F32
    high_mbps: F32
    source: npt.NDArray[np.int8]
    model_version: str


class Predictor:
    """Forecasts and allocation decisions on full windows, in process.

    Build it with :meth:`load`. Windows are ``[10, 4]`` or ``[N, 10, 4]``
    (:mod:`bwpredd.schema`'s ``WINDOW`` and ``WIDTH``) in raw units, feature
    order ``[latency_ms, bandwidth_mbps, packet_loss, reliability]``
    (``bwpredd.schema.FEATURES``), oldest sample first.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def load(cls, model_dir: str | Path | None = None, threads: int = 1) -> Predictor:
        """Load and verify a model directory.

        Args:
            model_dir: a model directory; None for the embedded default.
            threads: onnxruntime intra-op threads.

        Raises:
            bwpredd.errors.ModelError: the directory failed verification.
        """
        path = DEFAULT_MODEL_DIR if model_dir is None else Path(model_dir)
        return cls(Engine(load_model(path, threads)))

    @property
    def model_version(self) -> str:
        return self.engine.version

    @staticmethod
    def _batch(window: npt.ArrayLike) -> tuple[F32, bool]:
        w = np.asarray(window, dtype=np.float32)
        single = w.ndim == 2
        if single:
            w = w[None]
        if w.ndim != 3 or w.shape[1:] != (WINDOW, WIDTH):
            raise ValueError(
                f"window: expected shape [{WINDOW}, {WIDTH}] or [N, {WINDOW}, {WIDTH}], "
                f"got {list(w.shape)}"
            )
        if not np.isfinite(w).all():
            raise ValueError("window: values must be finite")
        return np.ascontiguousarray(w), single

    def forecast(self, window: npt.ArrayLike) -> Forecast:
        """Point forecast and interval of the next step's bandwidth.

        Args:
            window: ``[10, 4]`` or ``[N, 10, 4]`` raw units.
        """
        w, _ = self._batch(window)
        fc = self.engine.forecast(w, np.full(len(w), WINDOW, dtype=np.int64))
        return Forecast(fc.point, fc.low, fc.high, fc.source, fc.model_version)

    def predict_bandwidth(self, window: npt.ArrayLike) -> float | F32:
        """Next-step bandwidth, Mbit/s: a float for one window, ``[N]`` for a batch.

        Args:
            window: ``[10, 4]`` or ``[N, 10, 4]`` raw units.
        """
        w, single = self._batch(window)
        point = self.forecast(w).bandwidth_mbps
        return float(point[0]) if single else point

    def decide_allocation(
        self, window: npt.ArrayLike, step_s: float = DEFAULT_STEP_S
    ) -> int | npt.NDArray[np.int64]:
        """Greedy allocation action(s) 0-9, with the state built from the
        window exactly as the daemon builds it.

        Args:
            window: ``[10, 4]`` or ``[N, 10, 4]`` raw units.
            step_s: seconds between the window's samples (the daemon reads
                it from the samples' times).
        """
        if not step_s > 0:
            raise ValueError(f"step_s: must be > 0, got {step_s}")
        w, single = self._batch(window)
        counts = np.full(len(w), WINDOW, dtype=np.int64)
        fc = self.engine.forecast(w, counts)
        actions = self.engine.allocate(w, counts, fc, step_s).action
        return int(actions[0]) if single else actions

    def transfer_time(
        self, window: npt.ArrayLike, payload_bytes: npt.ArrayLike, step_s: npt.ArrayLike = 1.0
    ) -> TransferTime:
        """How long moving ``payload_bytes`` over the link takes, and its 80%
        interval: the payload uncompressed, without round trips or handshakes.

        With a model directory that declares horizons, the times come from
        the horizon forecasts (the bandwidth the transfer sees over its whole
        duration; :mod:`bwpredd.transfer`); without, from today's rule
        (payload over the next-step forecast, the interval's ends giving
        the time's).

        Args:
            window: ``[10, 4]`` or ``[N, 10, 4]`` raw units.
            payload_bytes: bytes to move, >= 0: a scalar or ``[N]``.
            step_s: seconds between the window's samples, > 0: a scalar or
                ``[N]`` (the daemon reads it from the samples' times).

        Returns:
            ``seconds``, ``low_seconds`` (10th percentile of the time) and
            ``high_seconds`` (90th): floats for one window, float64 ``[N]``
            for a batch.

        Raises:
            ValueError: a bad shape, or a payload or step breaking its rule.
        """
        w, single = self._batch(window)
        n = len(w)
        payload = _per_window("payload_bytes", payload_bytes, n)
        if not (np.isfinite(payload).all() and (payload >= 0).all()):
            raise ValueError("payload_bytes: must be finite and >= 0")
        step = _per_window("step_s", step_s, n)
        if not (np.isfinite(step).all() and (step > 0).all()):
            raise ValueError("step_s: must be finite and > 0")
        curves = self.engine.horizon_curves(w, step.astype(np.float32))
        if curves is not None:
            t, lo, hi = curves.seconds(payload)
        else:
            fc = self.forecast(w)
            t, lo, hi = next_step_seconds(
                fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps, bits_of(payload)
            )
        if single:
            return TransferTime(float(t[0]), float(lo[0]), float(hi[0]))
        return TransferTime(t, lo, hi)

    @staticmethod
    def allocation_percent(action: int) -> int:
        """The level of an action in percent: (action + 1) x 10."""
        return _allocation_percent(action)


def _per_window(name: str, value: npt.ArrayLike, n: int) -> npt.NDArray[np.float64]:
    """A scalar or ``[n]`` argument as float64 ``[n]``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected a scalar or [{n}] values, got shape {list(arr.shape)}")
    return arr
