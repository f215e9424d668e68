"""The bench's sections: what each measures, against which baseline.

Each section function takes a running :class:`bench.harness.Daemon` (or
starts its own) and the bare floors (:class:`bench.floor.Floor`), and
returns a dict of figures for ``bench.json``; :mod:`bench.report` turns them
into rows and targets. :class:`Plan` sizes a run, :class:`Fixture` holds the
payloads every daemon instance is loaded with.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2

from bench.floor import ECHO_METHOD, Floor, echo_request
from bench.harness import CHANNEL_OPTIONS, SERVICE, Daemon, channel, synthetic_windows
from bench.load import (
    REGISTERED,
    Target,
    cpu_ns,
    fill,
    latency_summary,
    random_batches,
    ratio,
    raw_unary,
    sample_message,
    stream_ingest,
    summaries,
    time_interleaved,
    window_batches,
)
from bench.report import progress
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.manifest import FORECASTER_INPUT, FORECASTER_OUTPUTS
from bwpredd.modeldir import DEFAULT_MODEL_DIR, LoadedModel, load_model

__all__ = [
    "ALLOCATE",
    "COLD_PEER",
    "FORECAST",
    "FRESH_PEER",
    "Fixture",
    "Plan",
    "batch_section",
    "fill_daemon",
    "fresh_section",
    "ingest_section",
    "latency_section",
    "memory_section",
    "startup_section",
    "watchers_section",
]

FORECAST = f"/{SERVICE}/Forecast"
ALLOCATE = f"/{SERVICE}/Allocate"
WATCH = f"/{SERVICE}/WatchForecasts"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
MODEL = pb.FORECAST_SOURCE_MODEL
COLD_PEER = "cold-0"  # one sample: answered by the baseline, no model run
FRESH_PEER = "fresh-0"  # gets a new sample before each timed call
PUSH_REPLY_BYTES = 2  # a PushSamplesResponse accepting one sample (accepted: 1)
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Plan:
    """Sizes and durations of one run (full or ``--quick``)."""

    latency_calls: int
    variant_calls: int  # latency calls of the log-off and ort_threads=2 daemons
    batch_reps: int
    ingest_s: float
    floor_ingest_s: float
    concurrency_s: float
    startups: int
    torch_reps_1: int
    torch_reps_1000: int
    memory_peers: int = 100_000
    batch_peers: int = 1_000
    ingest_peers: int = 10_000
    ingest_batch: int = 1_000
    ingest_depth: int = 4
    clients: int = 16
    watchers: int = 1_000  # idle watch-all WatchForecasts streams in the watchers row
    mesh_peers: int = 999  # the mesh row: peers of one node of a 1,000-node mesh
    mesh_s: float = 10.0  # seconds per allocation pattern in the mesh row; 0 skips it
    # The recording row: rounds of recording_round_s seconds on each daemon,
    # alternating which goes first.
    recording_rounds: int = 10
    recording_round_s: float = 3.0
    # Full runs also load the log-off daemon and the sync floor with clients.
    every_variant: bool = True

    @classmethod
    def make(cls, quick: bool) -> Plan:
        if quick:  # a smoke test of every section, not a measurement
            return cls(
                300,
                200,
                6,
                2.0,
                1.0,
                2.0,
                2,
                50,
                3,
                memory_peers=20_000,
                clients=4,
                mesh_s=0.0,
                recording_rounds=2,
                recording_round_s=1.0,
                every_variant=False,
            )
        return cls(3000, 1000, 30, 10.0, 5.0, 10.0, 5, 300, 10)


@dataclass
class Fixture:
    """What every daemon instance is loaded with before it is measured."""

    batch_peers: list[str]
    batch_windows: F32
    batch_fill: list[bytes]
    ingest_load: list[bytes]
    conc_ingest: list[bytes]
    forecast_one: list[bytes]  # one ForecastRequest per batch peer

    @classmethod
    def make(cls, plan: Plan) -> Fixture:
        peers = [f"batch-{i:04d}" for i in range(plan.batch_peers)]
        windows = synthetic_windows(plan.batch_peers)
        return cls(
            batch_peers=peers,
            batch_windows=windows,
            batch_fill=window_batches(peers, windows),
            ingest_load=random_batches(24, plan.ingest_batch, plan.ingest_peers, seed=1),
            conc_ingest=random_batches(40, 100, plan.ingest_peers, seed=2),
            forecast_one=[pb.ForecastRequest(peer_ids=[p]).SerializeToString() for p in peers],
        )


def _check_model_sources(raw: bytes, expected: int) -> int:
    resp = pb.ForecastResponse.FromString(raw)
    got = sum(1 for f in resp.forecasts if f.source == MODEL)
    if len(resp.forecasts) != expected:
        raise RuntimeError(f"Forecast answered {len(resp.forecasts)} peers, not {expected}")
    return got


def latency_section(
    daemon: Daemon, floors: dict[str, Floor], fx: Fixture, calls: int
) -> dict[str, Any]:
    """Forecast and Allocate for one peer vs bare echoes of the same sizes."""
    peer = fx.batch_peers[0]
    with channel(daemon.address) as dch:
        fc = raw_unary(dch, FORECAST)
        al = raw_unary(dch, ALLOCATE)
        fc_req = pb.ForecastRequest(peer_ids=[peer]).SerializeToString()
        al_req = pb.AllocateRequest(peer_ids=[peer]).SerializeToString()
        fc_resp, al_resp = fc(fc_req), al(al_req)
        if _check_model_sources(fc_resp, 1) != 1:
            raise RuntimeError("latency: the peer is not answered by the MODEL")
        if pb.AllocateResponse.FromString(al_resp).allocations[0].source != MODEL:
            raise RuntimeError("latency: the allocation is not from the MODEL")
        hc = raw_unary(dch, HEALTH_CHECK)
        hc_req = health_pb2.HealthCheckRequest(service="").SerializeToString()
        cold_req = pb.ForecastRequest(peer_ids=[COLD_PEER]).SerializeToString()
        targets: dict[str, Target] = {
            "forecast": (lambda: fc(fc_req), daemon.pid),
            "allocate": (lambda: al(al_req), daemon.pid),
            # The daemon's own server answering its cheapest RPC: what the
            # grpc.aio stack costs in this process before any handler work.
            "daemon_health_check": (lambda: hc(hc_req), daemon.pid),
            # A cold-start peer: the whole Forecast path minus the model.
            "forecast_cold_start": (lambda: fc(cold_req), daemon.pid),
        }
        channels = []
        for kind, floor in floors.items():
            ch = channel(floor.address)
            channels.append(ch)
            echo = raw_unary(ch, ECHO_METHOD)
            fe = echo_request(len(fc_req), len(fc_resp))
            ae = echo_request(len(al_req), len(al_resp))
            pid = floor.proc.pid
            targets[f"echo_{kind}_forecast_size"] = (functools.partial(echo, fe), pid)
            targets[f"echo_{kind}_allocate_size"] = (functools.partial(echo, ae), pid)
        try:
            times = time_interleaved(targets, calls, block=100)
        finally:
            for ch in channels:
                ch.close()
    out: dict[str, Any] = {
        "calls": calls,
        "bytes": {
            "forecast": [len(fc_req), len(fc_resp)],
            "allocate": [len(al_req), len(al_resp)],
        },
    }
    out.update(summaries(times))
    out["fresh"] = fresh_section(daemon, floors["aio"], (len(fc_resp), len(al_resp)), calls)
    for rpc in ("forecast", "allocate"):
        floors_p50 = {k: out[f"echo_{k}_{rpc}_size"]["p50_us"] for k in floors}
        best = min(floors_p50, key=lambda k: floors_p50[k])
        out[f"{rpc}_floor"] = best
        out[f"{rpc}_p50_ratio"] = ratio(out[rpc]["p50_us"], floors_p50[best])
        out[f"{rpc}_p99_ratio"] = ratio(
            out[rpc]["p99_us"], out[f"echo_{best}_{rpc}_size"]["p99_us"]
        )
        out[f"{rpc}_p50_overhead_us"] = round(out[rpc]["p50_us"] - floors_p50[best], 1)
        floor_cpu = out[f"echo_{best}_{rpc}_size"]["server_cpu_us"]
        out[f"{rpc}_server_cpu_ratio"] = ratio(out[rpc]["server_cpu_us"], floor_cpu)
        out[f"{rpc}_handler_cpu_us"] = round(
            out[rpc]["server_cpu_us"] - out["daemon_health_check"]["server_cpu_us"], 1
        )
    return out


def fresh_section(
    daemon: Daemon, floor: Floor, reply_bytes: tuple[int, int], calls: int
) -> dict[str, Any]:
    """Forecast and Allocate of one peer right after each of its new samples
    (:func:`_fresh_latency`), ``calls // 3`` (at least 50) of each.

    Args:
        reply_bytes: the sizes of a one-peer Forecast and Allocate reply,
            for the echo timed alongside.
    """
    fresh = pb.ForecastRequest(peer_ids=[FRESH_PEER]).SerializeToString()
    fresh_al = pb.AllocateRequest(peer_ids=[FRESH_PEER]).SerializeToString()
    return _fresh_latency(
        daemon,
        floor,
        {
            "forecast": (FORECAST, fresh, reply_bytes[0]),
            "allocate": (ALLOCATE, fresh_al, reply_bytes[1]),
        },
        max(50, calls // 3),
    )


def _fresh_latency(
    daemon: Daemon,
    floor: Floor,
    rpcs: dict[str, tuple[str, bytes, int]],
    calls: int,
) -> dict[str, Any]:
    """Forecast and Allocate right after a new sample for the peer: no cached
    answer, the model runs. Each timed call follows a PushSamples of one
    sample and is paired with an echo of the same sizes, timed alongside; the
    PushSamples calls are timed too (``push``, against echoes of their own
    sizes after the Forecast rounds), and so is each pair, the PushSamples
    and the call after it (``with_push_p50_us``): what a worker that pushes
    and then asks waits for.

    Args:
        rpcs: per name, ``(method, request bytes, reply size)``.
    """
    pushes = [
        pb.PushSamplesRequest(
            samples=[pb.Sample(peer_id=FRESH_PEER, bandwidth_mbps=50.0 + (i % 97), latency_ms=20.0)]
        ).SerializeToString()
        for i in range(calls + 10)
    ]
    clock = time.perf_counter_ns
    out: dict[str, Any] = {}
    with channel(daemon.address) as dch, channel(floor.address) as ech:
        push = raw_unary(dch, f"/{SERVICE}/PushSamples")
        for raw in pushes[calls:]:  # a full window: the model answers
            push(raw)
        echo = raw_unary(ech, ECHO_METHOD)
        push_echo = echo_request(len(pushes[0]), PUSH_REPLY_BYTES)
        push_ns: list[int] = []
        push_floor_ns: list[int] = []
        for rpc, (method, req, size) in rpcs.items():
            call = raw_unary(dch, method)
            echo_req = echo_request(len(req), size)
            own: list[int] = []
            pair: list[int] = []
            floor_ns: list[int] = []
            for i in range(calls):
                t = clock()
                push(pushes[i])
                t0 = clock()
                call(req)
                t1 = clock()
                echo(echo_req)
                t2 = clock()
                if len(push_ns) < calls:  # the first RPC's rounds
                    echo(push_echo)
                    push_floor_ns.append(clock() - t2)
                    push_ns.append(t0 - t)
                floor_ns.append(t2 - t1)
                own.append(t1 - t0)
                pair.append(t1 - t)
            mine = latency_summary(np.asarray(own, dtype=np.int64))
            base = latency_summary(np.asarray(floor_ns, dtype=np.int64))
            both = latency_summary(np.asarray(pair, dtype=np.int64))
            out[rpc] = {**mine, "echo_p50_us": base["p50_us"], "with_push_p50_us": both["p50_us"]}
            out[f"{rpc}_p50_ratio"] = ratio(mine["p50_us"], base["p50_us"])
        mine = latency_summary(np.asarray(push_ns, dtype=np.int64))
        base = latency_summary(np.asarray(push_floor_ns, dtype=np.int64))
        out["push"] = {**mine, "echo_p50_us": base["p50_us"]}
        out["push_p50_ratio"] = ratio(mine["p50_us"], base["p50_us"])
    return out


def raw_model(threads: int) -> LoadedModel:
    """The embedded default model, loaded exactly as the daemon loads it."""
    return load_model(DEFAULT_MODEL_DIR, threads)


def batch_section(
    daemon: Daemon, floors: dict[str, Floor], fx: Fixture, plan: Plan, threads: int
) -> dict[str, Any]:
    """Forecast for every batch peer in one call vs raw onnxruntime on the same
    windows in this process (same session options: the daemon's own loader)."""

    model = raw_model(threads)
    sess = model.forecaster
    names = list(FORECASTER_OUTPUTS)
    windows = np.ascontiguousarray(fx.batch_windows)
    req = pb.ForecastRequest(peer_ids=fx.batch_peers).SerializeToString()
    with channel(daemon.address) as dch:
        fc = raw_unary(dch, FORECAST)
        resp = fc(req)
        n_model = _check_model_sources(resp, len(fx.batch_peers))
        parsed = pb.ForecastResponse.FromString(resp)
        mine = sess.run(names, {FORECASTER_INPUT: windows})[0][:, 0]
        theirs = np.array([f.bandwidth_mbps for f in parsed.forecasts])
        parity = float(np.max(np.abs(theirs - mine) / np.maximum(np.abs(mine), 1e-3)))
        targets: dict[str, Target] = {
            "daemon_rpc": (lambda: fc(req), daemon.pid),
            "raw_onnxruntime": (lambda: sess.run(names, {FORECASTER_INPUT: windows}), os.getpid()),
        }
        channels = []
        for kind, floor in floors.items():
            ch = channel(floor.address)
            channels.append(ch)
            echo = raw_unary(ch, ECHO_METHOD)
            payload = echo_request(len(req), len(resp))
            targets[f"echo_{kind}_same_size"] = (
                functools.partial(echo, payload),
                floor.proc.pid,
            )
        try:
            times = time_interleaved(targets, plan.batch_reps, block=5, warmup=3)
        finally:
            for ch in channels:
                ch.close()
    out: dict[str, Any] = {
        "peers": len(fx.batch_peers),
        "ort_threads": threads,
        "reps": plan.batch_reps,
        "bytes": [len(req), len(resp)],
        "model_sourced": n_model,
        "max_rel_diff_vs_raw": parity,
    }
    out.update(summaries(times))
    raw = out["raw_onnxruntime"]["p50_us"]
    out["ratio_p50"] = ratio(out["daemon_rpc"]["p50_us"], raw)
    best_echo = min(out[f"echo_{k}_same_size"]["p50_us"] for k in floors)
    out["rpc_floor_p50_us"] = best_echo
    out["daemon_minus_raw_minus_rpc_floor_us"] = round(
        out["daemon_rpc"]["p50_us"] - raw - best_echo, 1
    )
    out["server_cpu_ratio"] = ratio(
        out["daemon_rpc"]["server_cpu_us"], out["raw_onnxruntime"]["server_cpu_us"]
    )
    return out


def ingest_section(
    daemon: Daemon | None, floors: dict[str, Floor], fx: Fixture, plan: Plan
) -> dict[str, Any]:
    """StreamSamples, 1,000-sample batches over 10,000 peers, pipelined."""
    out: dict[str, Any] = {
        "batch_samples": plan.ingest_batch,
        "peers": plan.ingest_peers,
        "depth": plan.ingest_depth,
    }
    for kind, floor in floors.items():
        progress(f"ingest: minimal {kind} server, {plan.floor_ingest_s:g} s")
        r = stream_ingest(
            floor.address,
            fx.ingest_load,
            plan.ingest_depth,
            duration=plan.floor_ingest_s,
            pid=floor.proc.pid,
        )
        out[f"floor_{kind}"] = r.as_dict()
    if daemon is not None:
        progress(f"ingest: daemon, {plan.ingest_s:g} s")
        r = stream_ingest(
            daemon.address,
            fx.ingest_load,
            plan.ingest_depth,
            duration=plan.ingest_s,
            pid=daemon.pid,
        )
        out["daemon"] = r.as_dict()
        out["all_accepted"] = r.rejected == 0 and r.accepted == r.batches * plan.ingest_batch
        best = max(out[f"floor_{k}"]["samples_per_s"] for k in floors) if floors else 0
        out["daemon_over_best_floor"] = ratio(r.rate, best)
        cheapest = min(out[f"floor_{k}"]["server_cpu_us_per_sample"] for k in floors)
        out["daemon_cpu_per_sample_over_floor"] = ratio(
            out["daemon"]["server_cpu_us_per_sample"], cheapest
        )
    return out


def _settle(pid: int, timeout_s: float = 300.0) -> float:
    """Wait until the daemon's CPU use falls under 5% of a core over 1 s;
    return the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        c0 = cpu_ns(pid)
        time.sleep(1.0)
        if cpu_ns(pid) - c0 < 0.05e9:
            break
    return time.perf_counter() - t0


def watchers_section(workdir: Path, fx: Fixture, plan: Plan) -> dict[str, Any]:
    """The ingest load on a daemon with ``plan.watchers`` watch-all
    WatchForecasts streams open that never read, against the same load on
    the same daemon before they opened (the daemon allows that many
    watchers; its defaults refuse them)."""
    n = plan.watchers
    env = {"BWPREDD_MAX_WATCHERS": str(n), "BWPREDD_MAX_WATCHERS_PER_PEER": str(n)}
    out: dict[str, Any] = {"watchers": n, "peers": plan.ingest_peers}
    with Daemon(workdir, "watchers", env) as d:
        fill(d.address, fx.ingest_load)
        progress(f"watchers: plain ingest, {plan.ingest_s:g} s")
        plain = stream_ingest(
            d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s, pid=d.pid
        )
        rss_before = d.rss_kib()
        progress(f"watchers: opening {n} watch-all streams that never read")
        # Without BDP probing the client's windows stay at 64 KiB, so each
        # stream stops the daemon after ~1,000 forecasts instead of ~60,000.
        options = [*CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(d.address, options=options) as ch:
            call = ch.unary_stream(WATCH, **REGISTERED)
            request = pb.WatchForecastsRequest().SerializeToString()
            # In waves: each new watcher first sends its ~1,000 forecasts,
            # and a call the daemon has not taken up within 30 s is cancelled
            # (grpc.server_max_unrequested_time_in_server).
            calls: list[Any] = []
            t0 = time.perf_counter()
            while len(calls) < n:
                calls += [call(request, timeout=3600) for _ in range(min(50, n - len(calls)))]
                deadline = time.monotonic() + 60
                while d.metric("bwpredd_watchers{}") < len(calls) and time.monotonic() < deadline:
                    if any(c.done() for c in calls):  # refused or failed
                        break
                    time.sleep(0.2)
            out["settle_s"] = round(time.perf_counter() - t0 + _settle(d.pid), 1)
            out["watchers_open"] = int(d.metric("bwpredd_watchers{}"))
            out["watchers_failed"] = sorted({c.code().name for c in calls if c.done()})
            rss_open = d.rss_kib()
            progress(f"watchers: ingest with {out['watchers_open']} open, {plan.ingest_s:g} s")
            watched = stream_ingest(
                d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s, pid=d.pid
            )
            rss_after = d.rss_kib()
            for c in calls:
                c.cancel()
    out["plain"] = plain.as_dict()
    out["watched"] = watched.as_dict()
    out["all_accepted"] = not plain.rejected and not watched.rejected
    out["ratio"] = ratio(watched.rate, plain.rate)
    out["cpu_per_sample_ratio"] = ratio(
        out["watched"]["server_cpu_us_per_sample"], out["plain"]["server_cpu_us_per_sample"]
    )
    out["rss_before_mb"] = round(rss_before / 1024, 1)
    out["rss_watchers_open_mb"] = round((rss_open - rss_before) / 1024, 1)
    out["rss_after_ingest_mb"] = round((rss_after - rss_before) / 1024, 1)
    return out


def memory_section(workdir: Path, plan: Plan) -> dict[str, Any]:
    """RSS of a daemon with ``memory_peers`` full windows over the same
    daemon empty (VmRSS from /proc)."""
    n = plan.memory_peers
    peers = [f"mem-{i:06d}" for i in range(n)]
    block = 1000
    blocks = [
        pb.StreamSamplesRequest(
            samples=[
                sample_message(p, (20.0, 100.0 + i % 7, 0.001, 0.99)) for i, p in enumerate(chunk)
            ]
        ).SerializeToString()
        for chunk in (peers[i : i + block] for i in range(0, n, block))
    ]
    with Daemon(workdir, "memory") as d:
        time.sleep(0.5)
        empty = d.rss_kib()
        payloads = [b for _ in range(10) for b in blocks]  # 10 samples per peer
        r = fill(d.address, payloads)
        time.sleep(0.5)
        full = d.rss_kib()
        with channel(d.address) as ch:
            fc = raw_unary(ch, FORECAST)
            resp = pb.ForecastResponse.FromString(
                fc(pb.ForecastRequest(peer_ids=[peers[0], peers[-1]]).SerializeToString())
            )
            windows_full = all(f.samples_in_window == 10 for f in resp.forecasts)
    return {
        "peers": n,
        "samples": r.accepted,
        "windows_full": windows_full,
        "rss_empty_mb": round(empty / 1024, 1),
        "rss_full_mb": round(full / 1024, 1),
        "delta_mb": round((full - empty) / 1024, 1),
        "fill_samples_per_s": round(r.rate),
    }


def startup_section(workdir: Path, plan: Plan) -> dict[str, Any]:
    """Process start to Health SERVING (the service, not just the server)."""
    times, own = [], []
    for i in range(plan.startups):
        d = Daemon(workdir, f"startup-{i}")
        try:
            times.append(d.start())
            own.append(d.startup_ms_logged())
        finally:
            d.stop()
    logged = [x for x in own if x is not None]
    return {
        "runs": [round(t, 3) for t in times],
        "median_s": round(float(np.median(times)), 3),
        "daemon_startup_ms_median": round(float(np.median(logged)), 1) if logged else None,
        "note": "daemon_startup_ms: the daemon's own startup() (model load to serving); "
        "the rest is interpreter start and imports",
    }


def fill_daemon(d: Daemon, fx: Fixture) -> None:
    """Fill every batch peer's window and give :data:`COLD_PEER` one sample."""
    fill(d.address, fx.batch_fill)
    cold = pb.StreamSamplesRequest(samples=[sample_message(COLD_PEER, (20.0, 100.0, 0.0, 1.0))])
    fill(d.address, [cold.SerializeToString()])
