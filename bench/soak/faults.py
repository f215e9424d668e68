"""The soak's daemon, with a record of each of its lifetimes, and the faults
the soak injects into it, each recorded with its outcome."""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import random
import signal
import time
from collections import Counter, defaultdict
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc

from bench.harness import Daemon
from bench.soak.common import Plan
from bench.soak.workers import vandal_main
from bwpredd.client import Client, channel_for

__all__ = ["Faults", "SoakDaemon", "wait_metric"]


class SoakDaemon(Daemon):
    """The soak's :class:`bench.harness.Daemon`: a state directory and a copy
    of the model in ``work``, the plan's limits, and the last scrape and the
    exit of every lifetime (a stop, or a crash found by :meth:`reap_crash`).

    Args:
        plan: the run's sizes and timings.
        work: the work directory (``state/`` and ``model/`` in it).
    """

    def __init__(self, plan: Plan, work: Path) -> None:
        super().__init__(
            work,
            "daemon",
            {
                "BWPREDD_STATE_DIR": str(work / "state"),
                "BWPREDD_MODEL_DIR": str(work / "model"),
                "BWPREDD_SNAPSHOT_INTERVAL_S": str(plan.snapshot_interval_s),
                "BWPREDD_MAX_PEERS": str(plan.max_peers),
                "BWPREDD_IDLE_EXPIRY_S": str(plan.idle_expiry_s),
                "BWPREDD_GRACE_PERIOD_S": str(plan.grace_period_s),
                "BWPREDD_LOG_RPCS": "false",
                "BWPREDD_LOG_FORMAT": "json",
            },
        )
        self.plan = plan
        self.work = work
        self.lifetimes: list[dict[str, Any]] = []  # final scrape + exit of each process

    def stop(
        self, sig: int = signal.SIGTERM, grace_s: float | None = None
    ) -> tuple[int | None, float]:
        """Scrape, signal, wait (the grace period and 30 s), record the lifetime;
        returns (exit code, seconds to exit)."""
        assert self.proc is not None
        last: dict[str, float] = {}
        with contextlib.suppress(OSError):
            last = self.scrape()
        grace = self.plan.grace_period_s + 30 if grace_s is None else grace_s
        code, took = super().stop(sig, grace)
        self.lifetimes.append(
            {"pid": self.proc.pid, "exit": code, "stop_s": round(took, 3), "metrics": last}
        )
        return code, took

    def reap_crash(self) -> int | None:
        """If the daemon died on its own, record it and return its exit code."""
        if self.proc is not None and self.proc.poll() is not None:
            self.lifetimes.append(
                {"pid": self.proc.pid, "exit": self.proc.returncode, "crashed": True, "metrics": {}}
            )
            code = self.proc.returncode
            self.proc = None
            return code
        return None

    def totals(self, prefix: str) -> dict[str, float]:
        """Counters starting with ``prefix``, summed over every lifetime."""
        out: dict[str, float] = defaultdict(float)
        for life in self.lifetimes:
            for k, v in life["metrics"].items():
                if k.startswith(prefix):
                    out[k] += v
        return dict(out)


def wait_metric(daemon: Daemon, key: str, above: float, timeout: float = 30.0) -> bool:
    """Whether the metric sample ``key`` rises above ``above`` within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = daemon.metric(key)
        if not math.isnan(value) and value > above:
            return True
        time.sleep(0.2)
    return False


# -- faults ------------------------------------------------------------------------------------


class Faults:
    """The faults the parent injects, each recorded with its outcome."""

    def __init__(
        self, daemon: SoakDaemon, work: Path, target: str, flood: Event, flood_size: Any
    ) -> None:
        self.daemon = daemon
        self.work = work
        self.target = target
        self.flood = flood
        self.flood_size = flood_size
        self.log: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.vandal_seed = 0
        self.started = time.time()
        self.ctx = mp.get_context("spawn")

    def begin(self) -> None:
        self.started = time.time()

    def record(self, kind: str, ok: bool, **detail: Any) -> None:
        self.counts[kind] += 1
        if not ok:
            self.failed[kind] += 1
        took = round(time.time() - self.started, 3)
        self.log.append(
            {"t": round(self.started, 3), "took_s": took, "fault": kind, "ok": ok, **detail}
        )

    def sighup(self) -> None:
        key = "bwpredd_model_reloads_total{outcome=ok}"
        before = self.daemon.metric(key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        self.record("sighup reload", wait_metric(self.daemon, key, before))

    def corrupt_model(self) -> None:
        """Flip one byte of the served forecaster, SIGHUP (must be refused and
        the old model keep serving), then put it back and SIGHUP again."""
        path = self.work / "model" / "forecaster.onnx"
        original = path.read_bytes()
        blob = bytearray(original)
        blob[len(blob) // 2] ^= 0xFF
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(bytes(blob))
        os.replace(tmp, path)
        failed_key = "bwpredd_model_reloads_total{outcome=failed}"
        before = self.daemon.metric(failed_key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        refused = wait_metric(self.daemon, failed_key, before)
        with Client(channel_for(self.target), timeout=5) as c:
            try:
                kept = c.health("bwpredd.model") == "SERVING"
            except grpc.RpcError:
                kept = False
        tmp.write_bytes(original)
        os.replace(tmp, path)
        ok_key = "bwpredd_model_reloads_total{outcome=ok}"
        before_ok = self.daemon.metric(ok_key)
        os.kill(self.daemon.pid, signal.SIGHUP)
        reverted = wait_metric(self.daemon, ok_key, before_ok)
        self.record(
            "corrupt model pushed and reverted",
            refused and kept and reverted,
            refused=refused,
            old_model_kept=kept,
            reverted=reverted,
        )

    def vandal(self, rng: random.Random) -> None:
        """A client process streaming without reading, SIGKILLed mid-stream."""
        self.vandal_seed += 1
        proc = self.ctx.Process(target=vandal_main, args=(self.target, self.vandal_seed))
        proc.start()
        time.sleep(rng.uniform(0.5, 1.5))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        with Client(channel_for(self.target), timeout=5) as c:
            try:
                up = c.health() == "SERVING"
            except grpc.RpcError:
                up = False
        self.record("client killed mid-stream", up and self.daemon.alive())

    def id_flood(self, verified: int) -> None:
        """Fill the table and evict some of the (older) throw-away peers by LRU,
        at most half of them, so verified peers, seen every few ms, are never the
        least recently seen: any verified peer missing afterwards is a loss."""
        key = "bwpredd_peer_evictions_total{cause=lru}"
        before = self.daemon.metric(key)
        peers = self.daemon.metric("bwpredd_peers{}")
        if math.isnan(peers):
            self.record("peer id flood", False, error="no metrics")
            return
        spare = max(0, int(peers) - verified)
        evict = max(20, min(400, spare // 2))
        self.flood_size.value = self.daemon.plan.max_peers - int(peers) + evict
        self.flood.set()
        ok = wait_metric(self.daemon, key, before, timeout=30)
        self.record("peer id flood", ok, size=int(self.flood_size.value), evict_target=evict)

    def restart(self) -> None:
        code, took = self.daemon.stop(signal.SIGTERM)
        ready = self.daemon.start()
        restored = self.daemon.metric("bwpredd_peers{}")
        self.record(
            "SIGTERM restart",
            code == 0,
            exit_code=code,
            drain_s=round(took, 3),
            ready_s=round(ready, 3),
            peers_restored=restored,
        )
