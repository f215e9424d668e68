"""Test helpers. The running daemon (in this process or as a child process)
and synthetic windows come from :mod:`bench.harness`, which the bench and the
soak use too; what is only the tests' is here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import (
    daemon_process,
    free_port,
    running_server,
    spawn_daemon,
    synthetic_windows,
    wait_for_health,
)
from bwpredd.client import pb

__all__ = [
    "HandTrace",
    "daemon_process",
    "free_port",
    "running_server",
    "sample",
    "spawn_daemon",
    "synthetic_windows",
    "wait_for_health",
    "write_csv_traces",
]


@dataclass
class HandTrace:
    """A trace built in a test: what the allocation environment reads."""

    source: str
    name: str
    step_s: float
    data: np.ndarray


def sample(peer: str, bw: float, **fields: Any) -> pb.Sample:
    """A Sample message."""
    return pb.Sample(peer_id=peer, bandwidth_mbps=bw, **fields)


def write_csv_traces(root: Path, length: int, seed: int = 0) -> Path:
    """A generic-CSV traces directory: two sources ("lab" around 5 Mbit/s,
    "home" around 80) of 4 files each, ``length`` steps of log-normal
    bandwidth and empty optional columns. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for source, base in (("lab", 5.0), ("home", 80.0)):
        (root / source).mkdir(parents=True)
        for k in range(4):
            bw = base * np.exp(rng.normal(0, 0.2, length))
            rows = "".join(f"{t},{b:.4f},,,\n" for t, b in enumerate(bw))
            (root / source / f"f{k}.csv").write_text(
                "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability\n" + rows
            )
    return root
