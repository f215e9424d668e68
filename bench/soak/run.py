"""``python -m bench.soak``: the schedule of faults, the run, the command line
(see :mod:`bench.soak`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import grpc

from bench import soak
from bench.harness import REPO, rss_kib
from bench.soak.checker import checker_main
from bench.soak.common import Plan
from bench.soak.faults import Faults, SoakDaemon
from bench.soak.report import summarise, table, write_reports
from bench.soak.verify import RssTrace, handling_p99, verify
from bench.soak.workers import Job, churn_main, reader_main, steady_main, watcher_main
from bwpredd.client import Client, channel_for
from bwpredd.modeldir import DEFAULT_MODEL_DIR

__all__ = ["main", "run", "schedule"]


def schedule(plan: Plan) -> list[tuple[float, str]]:
    """Fault times (seconds from the start): cycles of faults between the
    warm-up and the last 15 s, one SIGTERM restart per ~10 minutes placed late
    so the first daemon lifetime is long enough to measure memory."""
    start, end = plan.warmup_s, plan.seconds - 15.0
    cycle = ["vandal", "sighup", "flood", "vandal", "corrupt", "vandal"]
    every = max(6.0, min(60.0, (end - start) / (2 * len(cycle))))
    times: list[tuple[float, str]] = []
    t, i = start, 0
    while t < end and i < 10_000:
        times.append((t, cycle[i % len(cycle)]))
        t += every
        i += 1
    restarts = max(1, round(plan.minutes / 10))
    for k in range(restarts):
        at = start + (end - start) * (0.75 + 0.2 * k / restarts)
        times.append((at, "restart"))
    return sorted(times)


def run(plan: Plan, out_dir: Path) -> dict[str, Any]:
    """Run the soak; the daemon and every client process are gone on return
    (also on an error or Ctrl-C). The work directory (daemon log, state) is
    kept when the run fails."""
    work = Path(tempfile.mkdtemp(prefix="bwpredd-soak-"))
    shutil.copytree(DEFAULT_MODEL_DIR, work / "model")
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    daemon = SoakDaemon(plan, work)
    procs: list[tuple[Any, Connection]] = []
    passed = False
    try:
        report = _run(plan, daemon, ctx, stop, procs)
        passed = bool(report["passed"])
        write_reports(report, out_dir)
        return report
    finally:
        stop.set()
        for p, _ in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.kill()
        if daemon.alive() and daemon.proc is not None:
            daemon.proc.kill()
            daemon.proc.wait(timeout=10)
        if passed:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"soak: kept {work} (daemon.log, state/) for a look", flush=True)


def _run(
    plan: Plan,
    daemon: SoakDaemon,
    ctx: Any,
    stop: Event,
    procs: list[tuple[Any, Connection]],
) -> dict[str, Any]:
    work = daemon.work
    flood = ctx.Event()
    flood_size = ctx.Value("i", 0)
    t_start = time.time()
    ready_s = daemon.start()
    started: dict[int, float] = {daemon.pid: daemon.started_at}
    target = daemon.address
    t_end = t_start + plan.seconds
    fading_until = t_start + plan.warmup_s

    def spawn(fn: Callable[..., None], *args: Any) -> None:
        receiver, sender = ctx.Pipe(duplex=False)
        p = ctx.Process(target=fn, args=(*args, sender), daemon=True)
        p.start()
        sender.close()
        procs.append((p, receiver))

    job = Job(plan, target, t_end, fading_until)
    for i in range(plan.workers):
        spawn(steady_main, i, job, stop)
    spawn(churn_main, job, stop, flood, flood_size)
    spawn(reader_main, job, stop)
    spawn(watcher_main, job, stop)
    spawn(checker_main, job, str(work / "model"), stop)

    faults = Faults(daemon, work, target, flood, flood_size)
    plan_faults = schedule(plan)
    rng = random.Random(3)
    rss = RssTrace()
    crashes = 0
    health_failures = 0
    last_sample = 0.0
    ticks = 0
    print(
        f"soak: {plan.minutes:g} min, {plan.workers} steady workers x {plan.peers_per_worker} "
        f"peers + {plan.fading_peers} fading, max_peers {plan.max_peers}, "
        f"{len(plan_faults)} faults scheduled; work dir {work}",
        flush=True,
    )
    with Client(channel_for(target), timeout=5) as probe:
        while time.time() < t_end and ticks < 1_000_000:
            ticks += 1
            now = time.time()
            if (code := daemon.reap_crash()) is not None:
                crashes += 1
                print(f"soak: daemon died (exit {code}); restarting", flush=True)
                daemon.start()
                started[daemon.pid] = daemon.started_at
            if now - last_sample >= 1.0:
                last_sample = now
                with contextlib.suppress(OSError):
                    rss.points.append((now, daemon.pid, rss_kib(daemon.pid)))
                try:
                    probe.health()
                except grpc.RpcError:
                    health_failures += 1
            while plan_faults and now - t_start >= plan_faults[0][0]:
                _, kind = plan_faults.pop(0)
                faults.begin()
                if kind == "vandal":
                    faults.vandal(rng)
                elif kind == "sighup":
                    faults.sighup()
                elif kind == "corrupt":
                    faults.corrupt_model()
                elif kind == "flood":
                    faults.id_flood(plan.workers * plan.peers_per_worker)
                elif kind == "restart":
                    faults.restart()
                    started[daemon.pid] = daemon.started_at
                print(f"soak: t+{now - t_start:5.0f}s {faults.log[-1]}", flush=True)
            time.sleep(0.1)
    stop.set()
    results: list[dict[str, Any]] = []
    for p, conn in procs:
        if conn.poll(plan.call_timeout_s * 4 + 30):
            results.append(json.loads(conn.recv_bytes().decode()))
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    steady = [r for r in results if r["kind"] == "steady"]
    verdict = verify(target, steady)
    final_metrics = daemon.scrape()
    faults.begin()
    code, took = daemon.stop(signal.SIGTERM)
    faults.record("final SIGTERM", code == 0, exit_code=code, drain_s=round(took, 3))
    report = summarise(
        plan,
        daemon,
        faults,
        results,
        verdict,
        rss=rss,
        started=started,
        crashes=crashes,
        health_failures=health_failures,
        ready_s=ready_s,
        t_start=t_start,
    )
    report["final_metrics_sample"] = {
        k: v for k, v in final_metrics.items() if k.startswith("bwpredd_")
    }
    report["server_handling_p99_le_s"] = handling_p99(final_metrics)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak``; exit 0 when every check passed.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    doc = soak.__doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=doc.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run the load")
    parser.add_argument("--workers", type=int, default=4, help="steady worker processes")
    parser.add_argument("--peers-per-worker", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "reports", help="report directory")
    args = parser.parse_args(argv)
    if not 0.5 <= args.minutes <= 24 * 60:
        parser.error("--minutes: between 0.5 and 1440")
    plan = Plan(minutes=args.minutes, workers=args.workers, peers_per_worker=args.peers_per_worker)
    report = run(plan, args.out)
    print()
    print(table(report))
    print(f"\nwrote {args.out / 'soak.json'} and {args.out / 'soak.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
