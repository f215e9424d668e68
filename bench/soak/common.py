"""The soak's plan, its constants and the small helpers every part shares."""

from __future__ import annotations

import heapq
import math
import queue
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from bwpredd.client import pb
from bwpredd.schema import WINDOW

__all__ = [
    "BAD_CAUSES",
    "BAD_FIELD",
    "BAD_SHARE",
    "BASE_BW",
    "KEEP_ACCEPTED",
    "LATENCY_CAP",
    "WINDOW",
    "Plan",
    "Reservoir",
    "percentiles",
    "requests_from",
    "timestamp",
]

KEEP_ACCEPTED = 48  # accepted values remembered per peer (newest)
LATENCY_CAP = 100_000  # latencies kept per RPC (reservoir)
BASE_BW = 1000.0  # bandwidth = BASE_BW + sequence number: exact in float32
BAD_SHARE = 0.03
BAD_CAUSES = ("bandwidth_nan", "latency_negative", "loss_over_one", "peer_id_space", "ts_future")
BAD_FIELD = {
    "bandwidth_nan": "bandwidth_mbps",
    "latency_negative": "latency_ms",
    "loss_over_one": "packet_loss",
    "peer_id_space": "peer_id",
    "ts_future": "timestamp",
}


@dataclass(frozen=True)
class Plan:
    """Sizes and timings of one soak run."""

    minutes: float
    workers: int = 4
    peers_per_worker: int = 150
    fading_peers: int = 100
    churn_per_s: float = 40.0
    headroom: int = 2500  # max_peers - verified peers
    idle_expiry_s: float = 20.0
    snapshot_interval_s: float = 5.0
    grace_period_s: float = 5.0
    call_timeout_s: float = 10.0

    @property
    def seconds(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return min(60.0, max(15.0, 0.15 * self.seconds))

    @property
    def verified_peers(self) -> int:
        return self.workers * self.peers_per_worker + self.fading_peers

    @property
    def max_peers(self) -> int:
        return self.verified_peers + self.headroom


# -- small helpers --------------------------------------------------------------------------


class Reservoir:
    """At most ``cap`` values, uniformly sampled from everything added."""

    def __init__(self, cap: int = LATENCY_CAP, seed: int = 0) -> None:
        self.cap = cap
        self.values: list[float] = []
        self.seen = 0
        self.slowest: list[tuple[float, float]] = []  # min-heap of (ms, unix time)
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        item = (value, round(time.time() - value / 1e3, 3))  # (ms, when it started)
        if len(self.slowest) < 5:
            heapq.heappush(self.slowest, item)
        elif value > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, item)
        self.seen += 1
        if len(self.values) < self.cap:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.cap:
                self.values[j] = value


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp of unix ``seconds``."""
    ts = Timestamp()
    whole = math.floor(seconds)
    ts.seconds, ts.nanos = int(whole), int((seconds - whole) * 1e9)
    return ts


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of latencies in ms."""
    if not values:
        return {"n": 0, "p50_ms": math.nan, "p99_ms": math.nan, "max_ms": math.nan}
    arr = np.asarray(values)
    return {
        "n": len(values),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "max_ms": round(float(arr.max()), 3),
    }


def requests_from(q: queue.Queue[pb.StreamSamplesRequest | None]) -> Iterator[Any]:
    """A request iterator fed from a queue (None ends it); bounded by the queue."""
    while (item := q.get()) is not None:
        yield item
