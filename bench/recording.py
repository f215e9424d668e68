"""The bench's recording section: what recording every accepted sample
costs ingest (issue 18: at most 10% of its throughput).

Two daemons, each with a state directory of its own, one recording
(production defaults, but ``record_max_bytes`` 256 MiB so the run's disk use
stays bounded and pruning is part of what is measured) and one with
``record = false``, take the ingest row's load (StreamSamples, 1,000-sample
batches over 10,000 peers, pipelined) in alternating rounds of the same run,
so a drift of the machine hits both alike (10 rounds of 3 s each).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.harness import Daemon
from bench.load import StreamResult, fill, ratio, stream_ingest
from bench.report import progress
from bench.scenarios import Fixture, Plan

__all__ = ["RECORD_MAX_BYTES", "recording_section"]

RECORD_MAX_BYTES = 256 << 20
_RECORDED = "bwpredd_recorded_samples_total{}"
_DROPPED = "bwpredd_recording_dropped_samples_total{{reason={}}}"


def _total(runs: list[StreamResult]) -> dict[str, Any]:
    accepted = sum(r.accepted for r in runs)
    seconds = sum(r.seconds for r in runs)
    cpu = sum(r.server_cpu_s for r in runs)
    return {
        "rounds": [r.as_dict() for r in runs],
        "accepted": accepted,
        "rejected": sum(r.rejected for r in runs),
        "seconds": round(seconds, 3),
        "samples_per_s": round(accepted / seconds) if seconds else 0,
        "server_cpu_us_per_sample": round(cpu / max(accepted, 1) * 1e6, 3),
    }


def recording_section(workdir: Path, fx: Fixture, plan: Plan) -> dict[str, Any]:
    """Ingest throughput with recording on over the same with it off."""
    on = Daemon(
        workdir,
        "record-on",
        {
            "BWPREDD_STATE_DIR": str(workdir / "state-record-on"),
            "BWPREDD_RECORD_MAX_BYTES": str(RECORD_MAX_BYTES),
        },
    )
    off = Daemon(
        workdir,
        "record-off",
        {"BWPREDD_STATE_DIR": str(workdir / "state-record-off"), "BWPREDD_RECORD": "false"},
    )
    runs: dict[str, list[StreamResult]] = {"on": [], "off": []}
    with on, off:
        # Every peer known to both before anything is timed.
        warm = {name: fill(d.address, fx.ingest_load) for name, d in (("on", on), ("off", off))}
        for k in range(plan.recording_rounds):
            order = [("off", off), ("on", on)] if k % 2 == 0 else [("on", on), ("off", off)]
            for name, d in order:
                progress(
                    f"recording: round {k + 1}/{plan.recording_rounds}, recording {name}, "
                    f"{plan.recording_round_s:g} s"
                )
                runs[name].append(
                    stream_ingest(
                        d.address,
                        fx.ingest_load,
                        plan.ingest_depth,
                        duration=plan.recording_round_s,
                        pid=d.pid,
                    )
                )
        # Every accepted sample recorded or counted as dropped, before reading.
        accepted = warm["on"].accepted + sum(r.accepted for r in runs["on"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = on.scrape()
            done = m.get(_RECORDED, 0.0) + sum(
                m.get(_DROPPED.format(reason), 0.0) for reason in ("queue_full", "write_failed")
            )
            if done >= accepted:
                break
            time.sleep(0.5)
        m = on.scrape()
    out: dict[str, Any] = {
        "peers": plan.ingest_peers,
        "batch_samples": plan.ingest_batch,
        "depth": plan.ingest_depth,
        "record_max_bytes": RECORD_MAX_BYTES,
        "on": _total(runs["on"]),
        "off": _total(runs["off"]),
        "accepted_while_recording": accepted,
        "recorded": int(m.get(_RECORDED, 0.0)),
        "dropped_queue_full": int(m.get(_DROPPED.format("queue_full"), 0.0)),
        "dropped_write_failed": int(m.get(_DROPPED.format("write_failed"), 0.0)),
        "files_kept": int(m.get("bwpredd_recording_files{}", 0.0)),
        "bytes_kept": int(m.get("bwpredd_recording_bytes{}", 0.0)),
    }
    out["all_accepted"] = out["on"]["rejected"] == 0 and out["off"]["rejected"] == 0
    out["ratio"] = ratio(out["on"]["samples_per_s"], out["off"]["samples_per_s"])
    out["cpu_per_sample_ratio"] = ratio(
        out["on"]["server_cpu_us_per_sample"], out["off"]["server_cpu_us_per_sample"]
    )
    return out
