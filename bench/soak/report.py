"""The soak's report: the checks that make the verdict, the summary table,
``soak.json`` and ``soak.md``."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.soak.common import Plan, percentiles
from bench.soak.faults import Faults, SoakDaemon
from bench.soak.verify import RssTrace, near, rss_verdict

__all__ = ["summarise", "table", "write_reports"]


def summarise(
    plan: Plan,
    daemon: SoakDaemon,
    faults: Faults,
    results: list[dict[str, Any]],
    verdict: dict[str, Any],
    *,
    rss: RssTrace,
    started: dict[int, float],
    crashes: int,
    health_failures: int,
    ready_s: float,
    t_start: float,
) -> dict[str, Any]:
    latency: dict[str, list[float]] = defaultdict(list)
    calls: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    bad_sent: Counter[str] = Counter()
    bad_rejected: Counter[str] = Counter()
    bad_unacked: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    samples_sent = streams_cancelled = 0
    extra: dict[str, Any] = {}
    slow: list[tuple[float, float, str]] = []
    for r in results:
        for k, v in r.get("latency", {}).items():
            latency[k] += v
        for k, v in r.get("slowest", {}).items():
            slow += [(ms, at, k) for ms, at in v]
        calls.update(r.get("calls", {}))
        errors.update(r.get("errors", {}))
        if r["kind"] == "steady":
            bad_sent.update(r["bad_sent"])
            bad_rejected.update(r["bad_rejected"])
            bad_unacked.update(r["bad_unacked"])
            unexpected.update(r["unexpected"])
            samples_sent += r["samples_sent"]
            streams_cancelled += r["streams_cancelled"]
        else:
            extra[r["kind"]] = {
                k: v for k, v in r.items() if k not in ("latency", "slowest", "kind")
            }
    evictions = daemon.totals("bwpredd_peer_evictions_total")
    rejected = daemon.totals("bwpredd_samples_rejected_total")
    accepted = daemon.totals("bwpredd_samples_accepted_total")
    evicted_total = sum(evictions.values())
    steady_status = verdict["by_cohort"]["steady"]
    fading_status = verdict["by_cohort"]["fading"]
    missing = fading_status.get("evicted", 0) + fading_status.get("recreated", 0)
    growth = rss.growth(plan.warmup_s, started)
    workers_reported = sum(1 for r in results if r["kind"] == "steady")
    checker: dict[str, int] = extra.get("checker", {}).get("counts", {})
    ok = {True: "ok", False: "FAILED"}
    checks_ok = {
        "samples lost = 0": verdict["lost_samples"] == 0
        and verdict["statuses"].get("lost", 0) == 0,
        "steady peers all intact": set(steady_status) == {"intact"},
        "missing (fading) peers explained by evictions": missing <= evicted_total,
        "no unexpected rejections": not unexpected,
        "every deliberately bad sample rejected": bad_sent == bad_rejected + bad_unacked,
        "daemon never crashed": crashes == 0,
        "every SIGTERM exited 0": all(life.get("exit") == 0 for life in daemon.lifetimes),
        "every fault survived": not faults.failed,
        "one model version served throughout (the corrupt one never)": len(
            [v for v in extra.get("reader", {}).get("versions", {}) if v != "(none)"]
        )
        == 1,
        "all workers reported": workers_reported == plan.workers,
        "every answer checked matches its window; removed peers NOT_FOUND": (
            checker.get("answers_checked", 0) > 0
            and checker.get("removed_not_found", 0) > 0
            and not any(
                checker.get(k, 0)
                for k in ("mismatches", "removed_but_answered", "present_but_not_found")
            )
        ),
    }
    checks = {name: ok[bool(passed)] for name, passed in checks_ok.items()}
    checks["RSS growth < 5%/h after warm-up"] = rss_verdict(growth)
    return {
        "plan": asdict(plan) | {"max_peers": plan.max_peers, "warmup_s": plan.warmup_s},
        "passed": "FAILED" not in checks.values(),
        "checks": checks,
        "inputs": {
            "samples_sent_by_steady_workers": samples_sent,
            "bad_samples_sent": dict(bad_sent),
            "bad_samples_rejected_as_expected": dict(bad_rejected),
            "bad_samples_on_failed_calls": dict(bad_unacked),
            "calls": dict(calls),
            "streams_cancelled_mid_flight": streams_cancelled,
            "daemon_samples_accepted_total": sum(accepted.values()),
            "daemon_samples_rejected_by_field": rejected,
            **extra,
        },
        "faults": {
            "counts": dict(faults.counts),
            "failed": dict(faults.failed),
            "log": faults.log,
            "daemon_crashes": crashes,
            "health_check_failures": health_failures,
            "daemon_lifetimes": [
                {k: v for k, v in life.items() if k != "metrics"} for life in daemon.lifetimes
            ],
            "first_ready_s": round(ready_s, 3),
        },
        "verification": verdict | {"evictions_by_cause": evictions},
        "errors_by_cause": dict(errors),
        "unexpected": dict(unexpected),
        "latency": {k: percentiles(v) for k, v in sorted(latency.items())},
        "slowest_calls": [
            {"ms": round(ms, 1), "rpc": k, "t_s": round(at - t_start, 1)} | near(faults.log, at, ms)
            for ms, at, k in sorted(slow, reverse=True)[:10]
        ],
        "rss": growth,
        "rss_trace_kib": [
            [round(t - rss.points[0][0], 1), pid, kib] for t, pid, kib in rss.points[::5]
        ]
        if rss.points
        else [],
    }


def table(report: dict[str, Any]) -> str:
    """The summary as a markdown table."""
    v, f, i = report["verification"], report["faults"], report["inputs"]
    rate = i["daemon_samples_accepted_total"] / (report["plan"]["minutes"] * 60)
    rows: list[tuple[str, str]] = [
        ("duration", f"{report['plan']['minutes']:g} min"),
        ("verdict", "PASS" if report["passed"] else "FAIL"),
        ("samples sent (steady workers)", f"{i['samples_sent_by_steady_workers']:,}"),
        (
            "samples accepted by the daemon (all clients)",
            f"{i['daemon_samples_accepted_total']:,.0f}",
        ),
        (
            "ingest rate (accepted by the daemon)",
            f"{rate:,.0f} samples/s",
        ),
        ("samples acked to verified peers", f"{v['acked_samples']:,}"),
        (
            "deliberately bad samples (rejected / on failed calls / sent)",
            f"{sum(i['bad_samples_rejected_as_expected'].values()):,} / "
            f"{sum(i['bad_samples_on_failed_calls'].values()):,} / "
            f"{sum(i['bad_samples_sent'].values()):,}",
        ),
        ("samples lost", str(v["lost_samples"])),
        ("verified peers", ", ".join(f"{k} {n}" for k, n in sorted(v["statuses"].items()))),
        (
            "evictions (lru / idle)",
            f"{v['evictions_by_cause'].get('bwpredd_peer_evictions_total{cause=lru}', 0):,.0f} / "
            f"{v['evictions_by_cause'].get('bwpredd_peer_evictions_total{cause=idle}', 0):,.0f}",
        ),
        ("faults survived", ", ".join(f"{k} x{n}" for k, n in f["counts"].items())),
        ("faults failed", ", ".join(f"{k} x{n}" for k, n in f["failed"].items()) or "none"),
        ("streams cancelled mid-flight", str(i["streams_cancelled_mid_flight"])),
        (
            "answers checked against their windows (ok / mismatched / skipped)",
            f"{_chk(i, 'answers_checked'):,} / {_chk(i, 'mismatches'):,} / "
            f"{_chk(i, 'skipped_changed') + _chk(i, 'skipped_other_model'):,}",
        ),
        (
            "removed peers asked (NOT_FOUND / answered)",
            f"{_chk(i, 'removed_not_found'):,} / {_chk(i, 'removed_but_answered'):,}",
        ),
        ("daemon crashes", str(f["daemon_crashes"])),
        (
            "client errors by cause",
            ", ".join(f"{k} {n}" for k, n in sorted(report["errors_by_cause"].items())) or "none",
        ),
    ]
    rss = report["rss"]
    rows.append(
        (
            "RSS after warm-up",
            f"{rss.get('start_mib', '?')} -> {rss.get('end_mib', '?')} MiB over "
            f"{rss.get('window_s', 0):g} s (min {rss.get('min_mib', '?')}, max "
            f"{rss.get('max_mib', '?')}); slope {rss.get('pct_per_hour', math.nan):+.1f} %/h "
            f"[{rss.get('pct_per_hour_low', math.nan):+.1f}, "
            f"{rss.get('pct_per_hour_high', math.nan):+.1f}]",
        )
    )
    for name, lat in report["latency"].items():
        rows.append(
            (
                f"latency {name}",
                f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms, "
                f"max {lat['max_ms']:.1f} ms (n={lat['n']:,})",
            )
        )
    for name, outcome in report["checks"].items():
        rows.append((f"check: {name}", outcome))
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'what':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {k:<{width}} | {val} |" for k, val in rows]
    return "\n".join(lines)


def _chk(inputs: dict[str, Any], key: str) -> int:
    return int(inputs.get("checker", {}).get("counts", {}).get(key, 0))


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = [
        "# Soak",
        "",
        f"`python -m bench.soak --minutes {report['plan']['minutes']:g}` "
        "(`make soak DURATION=minutes`): several client processes against one daemon "
        "subprocess, with faults injected (see `bench/soak/`). Memory growth is the "
        "linear slope after warm-up over the longest daemon lifetime, extrapolated to "
        "an hour; on short runs it is a rough figure.",
        "",
        table(report),
        "",
    ]
    md += [
        "## Server-side handling time, p99 (histogram bucket bound, last daemon lifetime)",
        "",
        ", ".join(
            f"{m} <= {le * 1e3:g} ms" for m, le in report["server_handling_p99_le_s"].items()
        ),
        "",
        "## Slowest calls",
        "",
        "| ms | rpc | at (s) | last fault before it |",
        "|---|---|---|---|",
    ]
    for c in report["slowest_calls"]:
        fault = (
            f"{c['last_fault']} ({c['call_start_minus_fault_start_s']:+g} s)"
            if "last_fault" in c
            else "none"
        )
        md.append(f"| {c['ms']:g} | {c['rpc']} | {c['t_s']:g} | {fault} |")
    md.append("")
    if report["verification"]["notes"]:
        md += ["## Notes", ""] + [f"- {n}" for n in report["verification"]["notes"]] + [""]
    (out_dir / "soak.md").write_text("\n".join(md))
