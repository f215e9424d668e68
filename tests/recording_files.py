"""Test helper: recordings written with plain ``numpy.savez``, exactly as the
recording format (version 1) lays them out, so a test proves both that the
trainer reads the daemon's files and that standard tools write them.

Not a conftest: import it where needed with
``from tests.recording_files import write_recording, write_mesh``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bwpredd.schema import BW, DEFAULTS, FEATURES, WIDTH

__all__ = ["ALL_SENT", "contended_link", "write_mesh", "write_recording"]

ALL_SENT = (1 << WIDTH) - 1


def write_recording(
    directory: Path,
    node: str,
    peer: Sequence[str],
    t: npt.ArrayLike,
    features: npt.ArrayLike,
    *,
    sent: npt.ArrayLike | None = None,
    compressed: bool = False,
) -> Path:
    """Write one completed recording file ``rec-<ms>-<hex>.npz`` into
    ``directory`` (created), named after its last sample's time.

    Args:
        directory: the recordings directory.
        node: the recording node's name.
        peer: each row's peer id.
        t: each row's time, Unix seconds.
        features: ``[n, 4]`` rows in the schema's order.
        sent: each row's sent bits (default: every feature sent).
        compressed: ``savez_compressed`` instead of ``savez``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    t = np.asarray(t, dtype=np.float64)
    ms = int(t.max() * 1000) if t.size else 0
    path = directory / f"rec-{ms:015d}-{os.urandom(4).hex()}.npz"
    save = np.savez_compressed if compressed else np.savez
    save(
        path,
        version=np.int64(1),
        node=np.str_(node),
        peer=np.asarray(list(peer), dtype=np.str_),
        t=t,
        features=np.asarray(features, dtype=np.float32).reshape(-1, WIDTH),
        sent=np.full(t.shape, ALL_SENT, np.uint8) if sent is None else np.asarray(sent, np.uint8),
    )
    return path


def contended_link(n: int, rng: np.random.Generator, level: float) -> npt.NDArray[np.float32]:
    """``[n, 4]`` samples of a datacenter link shared with a periodic job:
    every 5 s the job takes 60% of it for 2 s, with 3% noise; latency rises
    while it runs. Last value is wrong at every edge of the cycle; a model
    that learns the cycle is not."""
    phase = (np.arange(n) + rng.integers(5)) % 5
    busy = phase >= 3
    bw = level * np.where(busy, 0.4, 1.0) * (1 + 0.03 * rng.standard_normal(n))
    out = np.empty((n, WIDTH), np.float32)
    out[:, BW] = np.maximum(bw, 0.0)
    out[:, FEATURES.index("latency_ms")] = np.where(busy, 1.2, 0.3) + 0.02 * rng.random(n)
    out[:, FEATURES.index("packet_loss")] = DEFAULTS["packet_loss"]
    out[:, FEATURES.index("reliability")] = DEFAULTS["reliability"]
    return out


def write_mesh(
    root: Path,
    nodes: Sequence[str] = ("node-a", "node-b"),
    *,
    peers: int = 3,
    steps: int = 400,
    step_s: float = 1.0,
    rows_per_file: int = 150,
    seed: int = 0,
    start: float = 1.7e9,
) -> dict[str, list[Path]]:
    """Recordings of ``peers`` contended links per node, each node under
    ``root/<node>/recordings/``, the peers' samples interleaved in
    acceptance order and cut into files of ``rows_per_file`` rows.

    Returns:
        The files written, by node.
    """
    rng = np.random.default_rng(seed)
    written: dict[str, list[Path]] = {}
    for node in nodes:
        ids = [f"{node}-peer-{k}" for k in range(peers)]
        levels = rng.uniform(500.0, 5000.0, size=peers)
        feats = np.stack([contended_link(steps, rng, lv) for lv in levels], axis=1)
        # Row r of peer k at start + r * step_s, peers a few ms apart.
        t = start + np.arange(steps)[:, None] * step_s + np.arange(peers)[None, :] * 0.003
        peer = np.broadcast_to(np.asarray(ids), (steps, peers)).reshape(-1)
        flat_t, flat_f = t.reshape(-1), feats.reshape(-1, WIDTH)
        files = []
        for a in range(0, len(flat_t), rows_per_file):
            b = a + rows_per_file
            files.append(
                write_recording(
                    root / node / "recordings", node, peer[a:b], flat_t[a:b], flat_f[a:b]
                )
            )
        written[node] = files
    return written
