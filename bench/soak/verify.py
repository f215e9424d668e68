"""The soak's verdicts on what the daemon kept: every acknowledged sample
against the windows at the end, resident memory growth, server-side latency."""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from bench.soak.common import KEEP_ACCEPTED, WINDOW
from bwpredd.client import Client, channel_for, pb

__all__ = ["RssTrace", "check_peer", "handling_p99", "near", "rss_verdict", "verify"]


def check_peer(track: dict[str, Any], peer: pb.Peer | None) -> tuple[str, int, str]:
    """Compare what a worker acked with what the daemon holds.

    Returns ``(status, samples lost, note)``; status is ``intact``,
    ``evicted`` (missing), ``recreated`` (evicted, then new samples), ``never``
    (nothing was acked) or ``lost``.
    """
    accepted: list[float] = track["accepted"]
    uncertain = set(track["uncertain"])
    total: int = track["total"]
    if peer is None:
        return ("evicted", 0, "") if total else ("never", 0, "")
    window = [s.bandwidth_mbps for s in peer.window]
    # A value from a failed call may land late (after a later acked call on
    # another HTTP/2 stream), so only the certain values must be in order.
    certain = [v for v in window if v not in uncertain]
    if any(b <= a for a, b in itertools.pairwise(certain)):
        return "lost", 0, f"window out of order: {window}"
    floor = accepted[0] if len(accepted) == KEEP_ACCEPTED else -math.inf
    phantom = [v for v in window if v not in accepted and v not in uncertain and v >= floor]
    if phantom:
        return "lost", 0, f"values never sent or acked: {phantom}"
    recreated = peer.sample_count < total
    # Every acked value newer than the oldest certain value of a full (or
    # re-created) window must be in it; a short window must hold them all.
    full = len(window) == WINDOW or recreated
    newest_floor = min(certain) if full and certain else -math.inf
    lost = [a for a in accepted if a >= newest_floor and a not in window]
    if lost:
        return "lost", len(lost), f"acked but missing: {lost[:5]} (window {window})"
    if not recreated and peer.sample_count > total + len(uncertain):
        return "lost", 0, f"sample_count {peer.sample_count} > acked {total} + uncertain"
    return ("recreated" if recreated else "intact"), 0, ""


def verify(target: str, steady: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`check_peer` on every peer of every steady worker's result."""
    statuses: Counter[str] = Counter()
    by_cohort: dict[str, Counter[str]] = {"steady": Counter(), "fading": Counter()}
    lost_samples = 0
    notes: list[str] = []
    acked = 0
    with Client(channel_for(target), timeout=10) as client:
        for res in steady:
            for cohort in ("peers", "fading"):
                for pid, track in res[cohort].items():
                    acked += track["total"]
                    try:
                        peer: pb.Peer | None = client.peer(pid)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                        peer = None
                    status, lost, note = check_peer(track, peer)
                    statuses[status] += 1
                    by_cohort["steady" if cohort == "peers" else "fading"][status] += 1
                    lost_samples += lost
                    if note and len(notes) < 20:
                        notes.append(f"{pid}: {note}")
    return {
        "acked_samples": acked,
        "statuses": dict(statuses),
        "by_cohort": {k: dict(v) for k, v in by_cohort.items()},
        "lost_samples": lost_samples,
        "notes": notes,
    }


@dataclass
class RssTrace:
    """Resident memory samples of the daemon's lifetimes."""

    points: list[tuple[float, int, int]] = field(default_factory=list)  # (t, pid, KiB)

    def growth(self, warmup_s: float, started: dict[int, float]) -> dict[str, Any]:
        """Linear-fit growth after warm-up over the longest daemon lifetime."""
        by_pid: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for t, pid, kib in self.points:
            if t - started[pid] >= warmup_s:
                by_pid[pid].append((t, kib))
        if not by_pid:
            return {"pct_per_hour": math.nan, "window_s": 0.0}
        pid, pts = max(by_pid.items(), key=lambda kv: kv[1][-1][0] - kv[1][0][0] if kv[1] else 0)
        if len(pts) < 5:
            return {"pct_per_hour": math.nan, "window_s": 0.0}
        times = np.array([p[0] for p in pts]) - pts[0][0]
        kibs = np.array([p[1] for p in pts], dtype=float)
        coef, cov = np.polyfit(times, kibs, 1, cov=True)
        slope, se = float(coef[0]), float(math.sqrt(cov[0, 0]))  # KiB/s
        per_hour = 3600 / kibs.mean() * 100
        return {
            "pid": pid,
            "window_s": round(float(times[-1]), 1),
            "start_mib": round(kibs[0] / 1024, 1),
            "end_mib": round(kibs[-1] / 1024, 1),
            "min_mib": round(kibs.min() / 1024, 1),
            "max_mib": round(kibs.max() / 1024, 1),
            "slope_kib_per_s": round(slope, 3),
            "pct_per_hour": round(slope * per_hour, 2),
            # +-2 standard errors of the slope; RSS moves in steps (allocator
            # arenas), so on short windows this band is wide and honest.
            "pct_per_hour_low": round((slope - 2 * se) * per_hour, 2),
            "pct_per_hour_high": round((slope + 2 * se) * per_hour, 2),
        }


def rss_verdict(growth: dict[str, Any], target: float = 5.0) -> str:
    """ok when the whole band is under the target; FAILED when the whole band
    is over it on a window of 5 minutes or more; otherwise inconclusive."""
    low, high = growth.get("pct_per_hour_low", math.nan), growth.get("pct_per_hour_high", math.nan)
    if high < target:
        return "ok"
    if low > target and growth.get("window_s", 0.0) >= 300:
        return "FAILED"
    return "inconclusive"


def handling_p99(metrics: dict[str, float]) -> dict[str, float]:
    """Per unary method, the histogram bucket bound holding the server-side
    99th percentile of handling time (last daemon lifetime): the daemon's own
    time, without the client's queueing and scheduling."""
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, value in metrics.items():
        if not key.startswith("grpc_server_handling_seconds_bucket{"):
            continue
        labels = dict(kv.split("=", 1) for kv in key[key.index("{") + 1 : -1].split(","))
        if labels.get("grpc_type") == "unary":
            buckets[labels["grpc_method"]].append((float(labels["le"]), value))
    out: dict[str, float] = {}
    for method, pts in buckets.items():
        pts.sort()
        total = pts[-1][1]
        if total:
            out[method] = next(le for le, n in pts if n >= 0.99 * total)
    return dict(sorted(out.items()))


def near(log: list[dict[str, Any]], start: float, ms: float) -> dict[str, Any]:
    """The last fault that began before a slow call ended (its likely cause)."""
    before = [f for f in log if f["t"] <= start + ms / 1e3]
    if not before:
        return {}
    f = before[-1]
    return {"last_fault": f["fault"], "call_start_minus_fault_start_s": round(start - f["t"], 1)}
