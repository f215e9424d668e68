"""``python -m bench --profile DIR``: the daemon under py-spy.

Records the daemon (collapsed stacks) under a Forecast load, an Allocate
load, the ingest load and a 1,000-peer Forecast load, and summarises each
file's top frames (:func:`summarize_profile`). Numbers from a profiled run
are perturbed and are not written as results.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import Daemon, channel
from bench.load import raw_unary, stream_ingest
from bench.report import progress
from bench.scenarios import ALLOCATE, FORECAST, Fixture, Plan, fill_daemon
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb

__all__ = ["profile_runs", "py_spy", "summarize_profile"]


_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('fn')} ({path})"


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Top frames of a py-spy ``--format raw`` (collapsed stacks) file.

    Args:
        path: the collapsed-stack file.
        top: rows per table.

    Returns:
        ``{"samples", "self": [(frame, share)], "inclusive": [(frame, share)]}``
        with shares of all samples; frames keyed by function and file.
    """
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += n
        self_n[frames[-1]] += n
        for f in set(frames):
            incl_n[f] += n

    def rows(c: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, round(k / total, 4)) for f, k in c.most_common(top)] if total else []

    return {"samples": total, "self": rows(self_n), "inclusive": rows(incl_n)}


@contextlib.contextmanager
def py_spy(pid: int, out: Path | None, name: str) -> Iterator[None]:
    """Record ``pid`` with py-spy (collapsed stacks) while the block runs."""
    if out is None:
        yield
        return
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"{name}.txt"
    proc = subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "--nonblocking",
            "--output",
            str(raw),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        if raw.exists():
            summary = summarize_profile(raw)
            (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            progress(f"profile {name}: {summary['samples']} samples -> {raw}")


def profile_runs(work: Path, fx: Fixture, plan: Plan, out: Path) -> None:
    """py-spy on the daemon under a Forecast load, an Allocate load and the
    ingest load (log_rpcs on, then off for the unary loads)."""
    for name, env in (("defaults", {}), ("log-off", {"BWPREDD_LOG_RPCS": "false"})):
        with Daemon(work, f"profile-{name}", env) as d:
            fill_daemon(d, fx)
            with channel(d.address) as ch:
                for rpc, method, req_type in (
                    ("forecast", FORECAST, pb.ForecastRequest),
                    ("allocate", ALLOCATE, pb.AllocateRequest),
                ):
                    call = raw_unary(ch, method)
                    req = req_type(peer_ids=[fx.batch_peers[0]]).SerializeToString()
                    progress(f"profile {rpc} ({name}): {plan.ingest_s:g} s")
                    with py_spy(d.pid, out, f"{rpc}-{name}"):
                        end = time.perf_counter() + plan.ingest_s
                        n = 0
                        while time.perf_counter() < end:
                            call(req)
                            n += 1
                    progress(f"  {n / plan.ingest_s:.0f} calls/s under the profiler")
            if name == "defaults":
                progress(f"profile ingest: {plan.ingest_s:g} s")
                with py_spy(d.pid, out, "ingest"):
                    r = stream_ingest(
                        d.address, fx.ingest_load, plan.ingest_depth, duration=plan.ingest_s
                    )
                progress(f"  {r.rate:.0f} samples/s under the profiler")
                batch = pb.ForecastRequest(peer_ids=fx.batch_peers).SerializeToString()
                with channel(d.address) as ch, py_spy(d.pid, out, "batch"):
                    call = raw_unary(ch, FORECAST)
                    end = time.perf_counter() + plan.ingest_s
                    while time.perf_counter() < end:
                        call(batch)
