"""What the bench says: progress lines while it runs, then the targets,
the table (printed, and ``bench.md``) and the machine it ran on.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.load import ratio

__all__ = [
    "HEADER",
    "RECORDING_TARGET",
    "machine_info",
    "progress",
    "render_markdown",
    "render_text",
    "table_rows",
    "targets_of",
]

MEMORY_TARGET = "RSS with full windows - empty"
MESH_TARGET = "mesh node, batched Allocate: daemon CPU share of one core"
RECORDING_TARGET = "ingest with recording on / off"
_T0 = time.perf_counter()


def progress(message: str) -> None:
    """One progress line on stderr, stamped with the bench's elapsed time."""
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- machine ------------------------------------------------------------------------


def machine_info(cores: Sequence[int]) -> dict[str, Any]:
    """CPU model, core counts and the versions that matter."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import google.protobuf
    import onnxruntime
    from google.protobuf.internal import api_implementation

    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "cores_used": list(cores),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": f"{google.protobuf.__version__} ({api_implementation.Type()})",
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def _target(name: str, value: float, op: str, limit: float, unit: str) -> dict[str, Any]:
    ok = value <= limit if op == "<=" else value >= limit
    return {"name": name, "value": value, "op": op, "target": limit, "unit": unit, "pass": ok}


def targets_of(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on the production-default daemon."""
    t: list[dict[str, Any]] = []
    if "latency" in res:
        lat = res["latency"]
        t.append(_target("Forecast p50 / floor p50", lat["forecast_p50_ratio"], "<=", 1.3, "x"))
        t.append(_target("Allocate p50 / floor p50", lat["allocate_p50_ratio"], "<=", 1.3, "x"))
    if "batch" in res:
        t.append(_target("Forecast x1000 / raw ORT", res["batch"]["ratio_p50"], "<=", 1.25, "x"))
    if "ingest" in res and "daemon" in res["ingest"]:
        ing = res["ingest"]
        rate = ing["daemon"]["samples_per_s"] if ing["all_accepted"] else 0
        t.append(_target("ingest accepted samples/s", rate, ">=", 250_000, "/s"))
    if "memory" in res:
        # 64 MB for 100,000 peers (the windows alone are 16 MB); pro rata
        # for the quick run's smaller table.
        limit = round(64 * res["memory"]["peers"] / 100_000, 1)
        t.append(_target(MEMORY_TARGET, res["memory"]["delta_mb"], "<=", limit, "MB"))
    if "mesh" in res:
        share = 100 * res["mesh"]["batched"]["daemon_cpu_share"]
        t.append(_target(MESH_TARGET, round(share, 1), "<=", 15.0, "%"))
    if "startup" in res:
        t.append(_target("start to SERVING (median)", res["startup"]["median_s"], "<=", 2.0, "s"))
    if "recording" in res:
        rec = res["recording"]
        value = rec["ratio"] if rec["all_accepted"] else 0.0
        t.append(_target(RECORDING_TARGET, value, ">=", 0.9, "x"))
    return t


def _row(*cells: str) -> list[str]:
    """figure, daemon, baseline, ratio, target, result."""
    return list(cells)


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    """The printed/markdown table: figure, daemon, baseline, ratio, target, pass."""
    rows: list[list[str]] = []
    judged = {t["name"]: t for t in targets_of(res)}

    def verdict(name: str) -> str:
        return ("PASS" if judged[name]["pass"] else "FAIL") if name in judged else ""

    for key, tag in (("latency", ""), ("latency_log_off", " (log_rpcs off)")):
        if key not in res:
            continue
        lat = res[key]
        for rpc, label in (("forecast", "Forecast"), ("allocate", "Allocate")):
            floor = lat[f"{rpc}_floor"]
            fl = lat[f"echo_{floor}_{rpc}_size"]
            p50_ratio = lat[f"{rpc}_p50_ratio"]
            name = f"{label} p50 / floor p50"
            rows.append(
                _row(
                    f"{label} 1 peer p50/p99{tag}",
                    f"{lat[rpc]['p50_us']:.0f}/{lat[rpc]['p99_us']:.0f} us",
                    f"{fl['p50_us']:.0f}/{fl['p99_us']:.0f} us ({floor} echo)",
                    f"{p50_ratio:.2f}x / {lat[f'{rpc}_p99_ratio']:.2f}x",
                    "p50 <= 1.3x",
                    verdict(name) if not tag else ("pass" if p50_ratio <= 1.3 else "fail"),
                )
            )
        rows.append(
            _row(
                f"  server CPU per call{tag}: Forecast, Allocate",
                f"{lat['forecast']['server_cpu_us']:.0f}, "
                f"{lat['allocate']['server_cpu_us']:.0f} us",
                f"{lat['echo_' + lat['forecast_floor'] + '_forecast_size']['server_cpu_us']:.0f} us"
                " echo",
                f"{lat['forecast_server_cpu_ratio']:.2f}x, {lat['allocate_server_cpu_ratio']:.2f}x",
                "",
                "",
            )
        )
        rows.append(
            _row(
                f"  daemon CPU: Health.Check / Forecast cold-start{tag}",
                f"{lat['daemon_health_check']['server_cpu_us']:.0f} / "
                f"{lat['forecast_cold_start']['server_cpu_us']:.0f} us",
                f"p50 {lat['daemon_health_check']['p50_us']:.0f} / "
                f"{lat['forecast_cold_start']['p50_us']:.0f} us",
                f"handler {lat['forecast_handler_cpu_us']:.0f}, "
                f"{lat['allocate_handler_cpu_us']:.0f} us",
                "",
                "",
            )
        )
        fresh = lat["fresh"]
        rows.append(
            _row(
                f"  after each new sample (model runs){tag}: Forecast, Allocate p50",
                f"{fresh['forecast']['p50_us']:.0f}, {fresh['allocate']['p50_us']:.0f} us",
                f"{fresh['forecast']['echo_p50_us']:.0f}, "
                f"{fresh['allocate']['echo_p50_us']:.0f} us aio echo",
                f"{fresh['forecast_p50_ratio']:.2f}x, {fresh['allocate_p50_ratio']:.2f}x",
                "",
                "",
            )
        )
        if "push" in fresh:
            rows.append(
                _row(
                    f"  PushSamples of one sample (before each of those){tag}: p50",
                    f"{fresh['push']['p50_us']:.0f} us",
                    f"{fresh['push']['echo_p50_us']:.0f} us aio echo",
                    f"{fresh['push_p50_ratio']:.2f}x",
                    "",
                    "",
                )
            )
        off = res.get("fresh_eager_off")
        if not tag and off is not None:
            rows.append(
                _row(
                    "  the same with eager_answers off (another daemon): Forecast, Allocate p50",
                    f"{off['forecast']['p50_us']:.0f}, {off['allocate']['p50_us']:.0f} us",
                    f"{off['forecast']['echo_p50_us']:.0f}, "
                    f"{off['allocate']['echo_p50_us']:.0f} us aio echo",
                    f"{off['forecast_p50_ratio']:.2f}x, {off['allocate_p50_ratio']:.2f}x",
                    "",
                    "",
                )
            )
            if "with_push_p50_us" in fresh["forecast"] and "with_push_p50_us" in off["forecast"]:
                on_pair = [fresh[k]["with_push_p50_us"] for k in ("forecast", "allocate")]
                off_pair = [off[k]["with_push_p50_us"] for k in ("forecast", "allocate")]
                rows.append(
                    _row(
                        "  PushSamples then Forecast, then Allocate (the pair a worker waits "
                        "for) p50: eager_answers on vs off",
                        f"{on_pair[0]:.0f}, {on_pair[1]:.0f} us",
                        f"{off_pair[0]:.0f}, {off_pair[1]:.0f} us off",
                        f"{ratio(on_pair[0], off_pair[0]):.2f}x, "
                        f"{ratio(on_pair[1], off_pair[1]):.2f}x",
                        "",
                        "",
                    )
                )
        sync_us = lat["echo_sync_forecast_size"]["p50_us"]
        aio_us = lat["echo_aio_forecast_size"]["p50_us"]
        rows.append(
            _row(
                f"  echo floors{tag}: asyncio vs sync p50",
                f"{aio_us:.0f} us aio",
                f"{sync_us:.0f} us sync",
                f"{ratio(aio_us, sync_us):.2f}x",
                "",
                "",
            )
        )
    for key, tag in (("batch", ""), ("batch_threads_2", " (ort_threads 2)")):
        if key not in res:
            continue
        b = res[key]
        rows.append(
            _row(
                f"Forecast x{b['peers']} p50{tag}",
                f"{b['daemon_rpc']['p50_us'] / 1e3:.2f} ms",
                f"{b['raw_onnxruntime']['p50_us'] / 1e3:.2f} ms raw ORT",
                f"{b['ratio_p50']:.2f}x",
                "<= 1.25x",
                verdict("Forecast x1000 / raw ORT") if not tag else "",
            )
        )
    if "latency_threads_2" in res:
        lt = res["latency_threads_2"]
        rows.append(
            _row(
                "Forecast 1 peer p50 (ort_threads 2)",
                f"{lt['forecast']['p50_us']:.0f} us",
                f"{lt['echo_' + lt['forecast_floor'] + '_forecast_size']['p50_us']:.0f} us",
                f"{lt['forecast_p50_ratio']:.2f}x",
                "",
                "",
            )
        )
    if "ingest" in res:
        ing = res["ingest"]
        floors = {
            k: ing[f"floor_{k}"]["samples_per_s"] for k in ("sync", "aio") if f"floor_{k}" in ing
        }
        if "daemon" in ing:
            dm = ing["daemon"]
            rows.append(
                _row(
                    "StreamSamples accepted samples/s",
                    f"{dm['samples_per_s']:,}" + ("" if ing["all_accepted"] else " (REJECTS)"),
                    ", ".join(f"{v:,} {k} floor" for k, v in floors.items()),
                    f"{ing['daemon_over_best_floor']:.2f}x",
                    ">= 250,000/s",
                    verdict("ingest accepted samples/s"),
                )
            )
            al = dm["ack_latency"]
            rows.append(
                _row(
                    f"  ack latency p50/p99 (depth {ing['depth']})",
                    f"{al['p50_us'] / 1e3:.1f}/{al['p99_us'] / 1e3:.1f} ms",
                    "",
                    "",
                    "",
                    "",
                )
            )
        if "daemon" in ing:
            rows.append(
                _row(
                    "  server CPU per sample",
                    f"{ing['daemon']['server_cpu_us_per_sample']:.2f} us",
                    ", ".join(
                        f"{ing[f'floor_{k}']['server_cpu_us_per_sample']:.2f} us {k}"
                        for k in floors
                    ),
                    f"{ing['daemon_cpu_per_sample_over_floor']:.2f}x",
                    "",
                    "",
                )
            )
    if "recording" in res:
        rec = res["recording"]
        lost = rec["dropped_queue_full"] + rec["dropped_write_failed"]
        rows.append(
            _row(
                "StreamSamples ingest, recording on",
                f"{rec['on']['samples_per_s']:,} samples/s"
                + ("" if rec["all_accepted"] else " (REJECTS)"),
                f"{rec['off']['samples_per_s']:,} samples/s recording off (same run)",
                f"{rec['ratio']:.2f}x",
                ">= 0.90x",
                verdict(RECORDING_TARGET),
            )
        )
        rows.append(
            _row(
                "  recording: server CPU per sample; samples recorded / dropped",
                f"{rec['on']['server_cpu_us_per_sample']:.2f} us",
                f"{rec['off']['server_cpu_us_per_sample']:.2f} us off",
                f"{rec['cpu_per_sample_ratio']:.2f}x",
                "",
                f"{rec['recorded']:,} / {lost:,}",
            )
        )
    if "watchers" in res:
        w = res["watchers"]
        rows.append(
            _row(
                f"ingest with {w['watchers']:,} idle watch-all watchers",
                f"{w['watched']['samples_per_s']:,} samples/s"
                + ("" if w["all_accepted"] else " (REJECTS)"),
                f"{w['plain']['samples_per_s']:,} samples/s, none open (same daemon)",
                f"{w['ratio']:.2f}x",
                "",
                f"{w['watchers_open']:,} open, RSS +{w['rss_after_ingest_mb']:.0f} MB",
            )
        )
    if "mesh" in res:
        m = res["mesh"]
        none = m["none"]
        for pattern, label in (
            ("per_peer", "1 Allocate per peer"),
            ("per_peer_eager_off", "1 Allocate per peer, eager_answers off,"),
            ("batched", "1 batched Allocate"),
        ):
            if pattern not in m:
                continue
            r = m[pattern]
            late = f", {r['dropped']:,} dropped" if r["dropped"] else ""
            rows.append(
                _row(
                    f"mesh node {m['peers']} peers at 1 Hz, {label}/s: CPU, p50/p99",
                    f"{100 * r['daemon_cpu_share']:.1f}% of a core, "
                    f"{r.get('p50_us', float('nan')):.0f}/{r.get('p99_us', float('nan')):.0f} us"
                    + late,
                    f"{100 * none['daemon_cpu_share']:.1f}% samples only",
                    "",
                    "<= 15% of a core" if pattern == "batched" else "",
                    verdict(MESH_TARGET) if pattern == "batched" else "",
                )
            )
    if "memory" in res:
        m = res["memory"]
        rows.append(
            _row(
                f"RSS {m['peers']:,} full windows - empty",
                f"{m['delta_mb']:.1f} MB",
                f"{m['rss_empty_mb']:.1f} MB empty",
                "",
                f"<= {64 * m['peers'] / 100_000:g} MB",
                verdict(MEMORY_TARGET),
            )
        )
    if "startup" in res:
        s = res["startup"]
        rows.append(
            _row(
                "start to Health SERVING (median)",
                f"{s['median_s']:.2f} s",
                f"{s['daemon_startup_ms_median']} ms in startup()",
                "",
                "<= 2 s",
                verdict("start to SERVING (median)"),
            )
        )
    if "onnx_vs_torch" in res and "batch_1" in res["onnx_vs_torch"]:
        o = res["onnx_vs_torch"]
        for batch in (1, 1000):
            b = o[f"batch_{batch}"]
            rows.append(
                _row(
                    f"forecaster batch {batch}: torch eager vs ORT",
                    f"{b['torch_eager']['p50_us']:.0f} us torch",
                    f"{b['onnxruntime']['p50_us']:.0f} us ORT",
                    f"{b['torch_over_ort_p50']:.2f}x",
                    "",
                    "",
                )
            )
    for key, tag in (
        ("concurrency", ""),
        ("concurrency_log_off", " (log_rpcs off)"),
        ("concurrency_floor_sync", " sync floor"),
        ("concurrency_floor_aio", " aio floor"),
    ):
        if key not in res:
            continue
        c = res[key]
        ul, il = c["unary_latency"], c["ingest_ack_latency"]
        rows.append(
            _row(
                f"{c['clients']} clients mixed{tag}",
                f"{c['unary_per_s']:,} unary/s + {c['samples_per_s']:,} samples/s",
                f"unary p50/p99 {ul.get('p50_us', 0) / 1e3:.1f}/{ul.get('p99_us', 0) / 1e3:.1f} ms",
                f"ack p50/p99 {il.get('p50_us', 0) / 1e3:.1f}/{il.get('p99_us', 0) / 1e3:.1f} ms",
                f"{c['server_cpu_cores']:.2f} server cores",
                "ERR" if c["errors"] or c["rejected"] else "",
            )
        )
    return rows


HEADER = ["figure", "daemon", "baseline", "ratio", "target", "result"]


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]], report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "## make bench",
        "",
        f"`{report['command']}` on {m['cpu_model']}, {m['logical_cpus']} logical CPUs "
        f"(all processes pinned to {m['cores_used']}), Python {m['python']}, grpcio "
        f"{m['grpcio']}, onnxruntime {m['onnxruntime']}; {report['finished']}"
        + (" (quick run)" if report["quick"] else "")
        + f"; load average {m['load_average_1_5_15_before'][0]} before, "
        f"{m['load_average_1_5_15_after'][0]} after.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    for run in report.get("merged", []):
        load = run["load_average_1_5_15_before"][0], run["load_average_1_5_15_after"][0]
        lines += [
            "",
            f"Re-measured by `{run['command']}` on {report['machine']['cpu_model']} "
            f"(same pinning), {run['finished']}"
            + (" (quick run)" if run["quick"] else "")
            + f"; load average {load[0]} before, {load[1]} after: the "
            + ", ".join(run["sections"])
            + " rows.",
        ]
    lines += [
        "",
        "Floors: bare grpcio echo servers (sync thread pool and asyncio) answering with "
        "messages of the daemon's request and reply sizes, and a minimal ingest server that "
        "only validates and writes numpy windows (`bench/floor.py`). All calls go "
        "through the same sync grpcio client with pre-serialized bytes. The daemon runs with "
        "its production defaults (metrics HTTP on, one log line per RPC) unless a row says "
        "otherwise; every figure is in `bench.json`.",
        "",
    ]
    return "\n".join(lines)
