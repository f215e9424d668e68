"""The soak's checker: every answer it gets against the one computed afresh
from the window GetPeer shows, through evictions, expiry and returns."""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.soak.common import WINDOW, timestamp
from bench.soak.workers import Job
from bwpredd.client import Client, channel_for, pb
from bwpredd.engine import Engine
from bwpredd.modeldir import load_model
from bwpredd.schema import FEATURES, WIDTH
from bwpredd.state import step_seconds

__all__ = ["checker_main"]


def _window_of(peer: pb.Peer) -> tuple[Any, Any, Any]:
    """GetPeer's window as the daemon's arrays: ``[1, W, WIDTH]`` padded at the
    front, counts ``[1]``, timestamps ``[1, W]``."""
    n = len(peer.window)
    window = np.zeros((1, WINDOW, WIDTH), dtype=np.float32)
    stamps = np.zeros((1, WINDOW), dtype=np.float64)
    for k, s in enumerate(peer.window):
        window[0, WINDOW - n + k] = [getattr(s, name) for name in FEATURES]
        stamps[0, WINDOW - n + k] = s.timestamp.seconds + s.timestamp.nanos * 1e-9
    return window, np.array([n], dtype=np.int64), stamps


def _same_window(a: pb.Peer, b: pb.Peer) -> bool:
    return (
        a.sample_count == b.sample_count
        and list(a.window) == list(b.window)
        and a.live_accuracy.guardrail_active == b.live_accuracy.guardrail_active
    )


def _answer_problem(engine: Engine, peer: pb.Peer, fc: Any, al: Any) -> str | None:
    """Why the answers ``fc`` and ``al`` are not the ones computed afresh
    from ``peer``'s window (None when they are)."""
    window, counts, stamps = _window_of(peer)
    guard = np.array([peer.live_accuracy.guardrail_active])
    ref = engine.forecast(window, counts, guard)
    ref_al = engine.allocate(window, counts, ref, step_seconds(stamps, counts))
    got = np.array([fc.bandwidth_mbps, fc.low_mbps, fc.high_mbps])
    want = np.array([ref.point[0], ref.low[0], ref.high[0]], dtype=np.float64)
    if fc.samples_in_window != len(peer.window):
        return f"samples_in_window {fc.samples_in_window}, window holds {len(peer.window)}"
    if fc.source != int(ref.source[0]) or not np.allclose(got, want, rtol=1e-4):
        return f"forecast {got.tolist()} source {fc.source}, window gives {want.tolist()}"
    if al.action != int(ref_al.action[0]) or not math.isclose(
        al.reference_capacity_mbps, float(ref_al.capacity[0]), rel_tol=1e-4
    ):
        return (
            f"allocation {al.action} at {al.reference_capacity_mbps:.6g}, window gives "
            f"{int(ref_al.action[0])} at {float(ref_al.capacity[0]):.6g}"
        )
    return None


def checker_main(job: Job, model_dir: str, stop: Event, out: Connection) -> None:
    """Answers against windows, through evictions, expiry and returns.

    Owns ``chk-*`` peers nobody else writes. A peer is fed a few samples at a
    time; now and then it naps past ``idle_expiry_s`` (so expiry removes it)
    and is fed again afterwards (it returns into whatever slot is free). Each
    check reads GetPeer, then Forecast and Allocate, then GetPeer again: if
    the window was the same both times, the answers must be the ones computed
    afresh from it by the same model; if the peer was absent both times, both
    calls must be NOT_FOUND. Anything in between (a change raced the check)
    is counted as skipped.
    """
    plan, target, t_end = job.plan, job.target, job.t_end
    rng = random.Random(13)
    engine = Engine(load_model(Path(model_dir), 1))
    client = Client(channel_for(target), timeout=plan.call_timeout_s)
    ids = [f"chk-{i:02d}" for i in range(24)]
    nap_until = dict.fromkeys(ids, 0.0)
    level = {p: 10.0 ** rng.uniform(-1, 4) for p in ids}
    last_ts = dict.fromkeys(ids, 0.0)
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    problems: list[str] = []

    def get(p: str) -> pb.Peer | None:
        try:
            return client.peer(p)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def answer(p: str) -> tuple[Any, Any] | None:
        """Forecast and Allocate, or None if both were NOT_FOUND."""
        got: list[Any] = []
        for call in (client.forecast, client.allocate):
            try:
                got.append(call([p])[0])
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                got.append(None)
        if got[0] is None and got[1] is None:
            return None
        return got[0], got[1]

    ops = 0
    while not stop.is_set() and time.time() < t_end and ops < 10_000_000:
        ops += 1
        p = rng.choice(ids)
        now = time.time()
        try:
            if now >= nap_until[p] and rng.random() < 0.5:
                if rng.random() < 0.03:
                    nap_until[p] = now + plan.idle_expiry_s * rng.uniform(1.5, 2.5)
                    counts["naps"] += 1
                    continue
                batch = []
                for _ in range(rng.randint(1, 4)):
                    last_ts[p] = max(last_ts[p] + 0.001, time.time())
                    bw = level[p] * rng.uniform(0.6, 1.4)
                    batch.append(
                        pb.Sample(
                            peer_id=p,
                            bandwidth_mbps=bw,
                            latency_ms=rng.uniform(1, 80),
                            timestamp=timestamp(last_ts[p]),
                        )
                    )
                client.push(batch)
                counts["pushes"] += 1
                continue
            before = get(p)
            answers = answer(p)
            after = get(p)
            if before is None and after is None:
                if answers is None:
                    counts["removed_not_found"] += 1
                else:
                    counts["removed_but_answered"] += 1
                    problems.append(f"{p}: answered while absent: {answers[0]}")
            elif before is not None and after is not None and _same_window(before, after):
                if answers is None or answers[0] is None or answers[1] is None:
                    counts["present_but_not_found"] += 1
                    problems.append(f"{p}: NOT_FOUND while GetPeer shows it")
                elif answers[0].model_version != engine.version:
                    counts["skipped_other_model"] += 1
                elif (why := _answer_problem(engine, before, *answers)) is not None:
                    counts["mismatches"] += 1
                    problems.append(f"{p}: {why}")
                else:
                    counts["answers_checked"] += 1
            else:
                counts["skipped_changed"] += 1
        except grpc.RpcError as err:
            errors[f"checker {err.code().name}"] += 1
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 0.01))
    client.close()
    result = {
        "kind": "checker",
        "counts": dict(counts),
        "problems": problems[:20],
        "errors": dict(errors),
    }
    out.send_bytes(json.dumps(result).encode())
    out.close()
