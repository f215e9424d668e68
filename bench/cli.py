"""``make bench``: measure the daemon against the floor of its own stack.

Every figure is a rate, or a ratio against a baseline measured in the same
run (these machines are noisy): the daemon runs as a separate process on a
unix socket with its production defaults (metrics on, one log line per RPC)
unless a row says otherwise, next to bare grpcio servers (sync and asyncio,
:mod:`bench.floor`) and a raw onnxruntime session in this process.
All processes are pinned to the same cores. The results go to
``<out>/bench.json`` (machine, figures, targets, pass/fail) and
``<out>/bench.md`` (a markdown table with the command that produced it).

``python -m bench [--quick] [--out DIR] [--only SECTIONS] [--merge] [--profile DIR]``
(``--merge``: the sections run replace theirs in ``DIR/bench.json``, the
others' figures stay);
``--profile`` records the daemon with py-spy under a Forecast load and under
the ingest load (numbers from a profiled run are perturbed and are not
written as results).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.floor import ECHO_METHOD, Floor, echo_request
from bench.harness import Daemon, channel
from bench.load import ClientPool, raw_unary
from bench.mesh import mesh_section
from bench.profile import profile_runs
from bench.recording import recording_section
from bench.report import (
    machine_info,
    progress,
    render_markdown,
    render_text,
    table_rows,
    targets_of,
)
from bench.scenarios import (
    FORECAST,
    Fixture,
    Plan,
    batch_section,
    fill_daemon,
    fresh_section,
    ingest_section,
    latency_section,
    memory_section,
    startup_section,
    watchers_section,
)
from bench.why_onnx import onnx_vs_torch

__all__ = ["SECTIONS", "main", "merge_reports", "run"]

SECTIONS = (
    "onnx",
    "startup",
    "latency",
    "batch",
    "ingest",
    "watchers",
    "concurrency",
    "memory",
    "threads",
    "mesh",
    "recording",
)


def run(plan: Plan, sections: Sequence[str], profile: Path | None = None) -> dict[str, Any]:
    """Run the chosen sections; return everything measured."""
    res: dict[str, Any] = {}
    fx = Fixture.make(plan)
    pool: ClientPool | None = None
    if "concurrency" in sections and profile is None:
        progress(f"concurrency: forking {plan.clients} client processes")
        pool = ClientPool(plan.clients)
    with tempfile.TemporaryDirectory(prefix="bwbench-") as tmp, contextlib.ExitStack() as stack:
        if pool is not None:
            stack.callback(pool.close)
        work = Path(tmp)
        if profile is not None:
            profile_runs(work, fx, plan, profile)
            return res
        if "onnx" in sections:
            progress("why ONNX: onnxruntime vs torch eager (child process)")
            res["onnx_vs_torch"] = onnx_vs_torch(1, plan.torch_reps_1, plan.torch_reps_1000)
        if "startup" in sections:
            progress(f"start-up: {plan.startups} starts")
            res["startup"] = startup_section(work, plan)
        if "memory" in sections:
            progress(f"memory: {plan.memory_peers} peers x 10 samples")
            res["memory"] = memory_section(work, plan)
        if "watchers" in sections:
            res["watchers"] = watchers_section(work, fx, plan)
        if "mesh" in sections and plan.mesh_s > 0:
            res["mesh"] = mesh_section(work, plan)
        if "recording" in sections:
            res["recording"] = recording_section(work, fx, plan)
        floors: dict[str, Floor] = {}
        try:
            progress("floors: sync and asyncio bare servers")
            floors = {k: Floor(work, k) for k in ("sync", "aio")}
            _daemon_runs(work, floors, pool=pool, fx=fx, plan=plan, sections=sections, res=res)
        finally:
            for f in floors.values():
                f.stop()
    return res


def _daemon_runs(
    work: Path,
    floors: dict[str, Floor],
    *,
    pool: ClientPool | None,
    fx: Fixture,
    plan: Plan,
    sections: Sequence[str],
    res: dict[str, Any],
) -> None:
    def mixed(address: str, pid: int, method: str, payloads: list[bytes]) -> dict[str, Any]:
        assert pool is not None
        return pool.mixed(
            address=address,
            pid=pid,
            duration=plan.concurrency_s,
            method=method,
            unary_payloads=payloads,
            ingest_payloads=fx.conc_ingest,
        )

    if {"latency", "batch", "ingest", "concurrency"} & set(sections):
        with Daemon(work, "defaults") as d:
            progress(f"daemon (defaults: log_rpcs on, ort_threads 1) pid {d.pid}")
            fill_daemon(d, fx)
            if "latency" in sections:
                progress(f"latency: {plan.latency_calls} calls per target")
                res["latency"] = latency_section(d, floors, fx, plan.latency_calls)
            if "batch" in sections:
                progress(f"batch: Forecast x{plan.batch_peers} peers, {plan.batch_reps} calls")
                res["batch"] = batch_section(d, floors, fx, plan, threads=1)
            if "ingest" in sections:
                res["ingest"] = ingest_section(d, floors, fx, plan)
            if pool is not None:
                progress(f"concurrency: daemon, {plan.concurrency_s:g} s")
                res["concurrency"] = mixed(d.address, d.pid, FORECAST, fx.forecast_one)
                with channel(d.address) as ch:
                    reply = len(raw_unary(ch, FORECAST)(fx.forecast_one[0]))
                echo = [echo_request(len(fx.forecast_one[0]), reply)]
                for kind, floor in floors.items():
                    if kind == "sync" and not plan.every_variant:
                        continue
                    progress(f"concurrency: {kind} floor (echo + minimal ingest)")
                    res[f"concurrency_floor_{kind}"] = mixed(
                        floor.address, floor.proc.pid, ECHO_METHOD, echo * plan.clients
                    )
    if plan.every_variant and {"latency", "concurrency"} & set(sections):
        with Daemon(work, "log-off", {"BWPREDD_LOG_RPCS": "false"}) as d:
            progress(f"daemon (log_rpcs off) pid {d.pid}")
            fill_daemon(d, fx)
            if "latency" in sections:
                progress("latency, log_rpcs off")
                res["latency_log_off"] = latency_section(d, floors, fx, plan.variant_calls)
            if pool is not None and plan.every_variant:
                progress("concurrency, log_rpcs off")
                res["concurrency_log_off"] = mixed(d.address, d.pid, FORECAST, fx.forecast_one)
    if plan.every_variant and "latency" in res:
        with Daemon(work, "eager-off", {"BWPREDD_EAGER_ANSWERS": "false"}) as d:
            progress(f"daemon (eager_answers off) pid {d.pid}: after each new sample")
            fill_daemon(d, fx)
            sizes = res["latency"]["bytes"]
            res["fresh_eager_off"] = fresh_section(
                d, floors["aio"], (sizes["forecast"][1], sizes["allocate"][1]), plan.latency_calls
            )
    if "threads" in sections:
        with Daemon(work, "threads-2", {"BWPREDD_ORT_THREADS": "2"}) as d:
            progress(f"daemon (ort_threads 2) pid {d.pid}")
            fill_daemon(d, fx)
            res["batch_threads_2"] = batch_section(d, floors, fx, plan, threads=2)
            res["latency_threads_2"] = latency_section(d, floors, fx, plan.variant_calls)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench``.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (smoke test)")
    parser.add_argument("--out", default="reports", help="where bench.json/bench.md go")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument("--cores", default="", help="CPUs to pin to (default: the first 2)")
    parser.add_argument("--profile", default="", help="py-spy the daemon into DIR instead")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other sections' figures from OUT/bench.json: the sections run "
        "replace theirs, and bench.md names the run that measured them",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    sections = [s for s in args.only.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown sections {sorted(unknown)}")
    available = sorted(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else available[:2]
    # Children inherit the affinity: daemon, floors and clients share these cores.
    os.sched_setaffinity(0, cores)
    plan = Plan.make(args.quick)
    command = "python -m bench" + (" " + shlex.join(argv) if argv else "")
    if argv is None and sys.argv[1:]:
        command = "python -m bench " + shlex.join(sys.argv[1:])
    started = time.perf_counter()
    load_before = [round(x, 2) for x in os.getloadavg()]
    profile = Path(args.profile) if args.profile else None
    res = run(plan, sections, profile)
    if profile is not None:
        progress(f"profiles in {profile}")
        return 0
    report: dict[str, Any] = {
        "command": command,
        "quick": args.quick,
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": round(time.perf_counter() - started, 1),
        "machine": {
            **machine_info(cores),
            # Other work on the machine inflates wall times; server CPU per
            # call/sample (the *_cpu_* figures) is robust to it.
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        },
        "plan": dataclasses.asdict(plan),
        "results": res,
        "targets": targets_of(res),
    }
    out = Path(args.out)
    if args.merge and (out / "bench.json").exists():
        report = merge_reports(json.loads((out / "bench.json").read_text()), report)
    rows = table_rows(report["results"])
    print(render_text(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (out / "bench.md").write_text(render_markdown(rows, report))
    failed = [t["name"] for t in report["targets"] if not t["pass"]]
    progress(
        f"wrote {out / 'bench.json'} and {out / 'bench.md'} in "
        f"{round(time.perf_counter() - started, 1)} s; "
        + (f"targets missed: {', '.join(failed)}" if failed else "all targets met")
    )
    return 0


def merge_reports(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the sections of ``new`` in place of its own: the run
    that measured them is listed under ``merged`` (command, time, load,
    sections, plan), the rest of ``old`` (its command, machine, plan) stays
    as it was."""
    results = {**old["results"], **new["results"]}
    run = {key: new[key] for key in ("command", "quick", "finished", "duration_s", "plan")} | {
        "sections": sorted(new["results"]),
        "load_average_1_5_15_before": new["machine"]["load_average_1_5_15_before"],
        "load_average_1_5_15_after": new["machine"]["load_average_1_5_15_after"],
    }
    merged = [m for m in old.get("merged", []) if set(m["sections"]) - set(new["results"])]
    return {**old, "results": results, "targets": targets_of(results), "merged": [*merged, run]}


if __name__ == "__main__":
    sys.exit(main())
