"""``make bench QUICK=1`` runs end to end and writes a valid report.

No timing is asserted: the bench's figures depend on the machine. This only
checks that every section runs against a real daemon and bare floors, and
that bench.json and bench.md carry what the README and the lead read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import REPO
from bench.profile import summarize_profile

# The torch comparison (onnx) imports torch in a child: slow to start, and
# covered by its own smoke below only when torch is there.
SECTIONS = "startup,latency,batch,ingest,watchers,concurrency,memory,recording"


def _bench(*args: str) -> None:
    """``python -m bench ARGS``, which must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
class TestQuickBench:
    """``python -m bench --quick`` on a temporary output directory."""

    def test_quick_run_writes_json_and_markdown(self, tmp_path: Path) -> None:
        """A quick run exits 0 and writes bench.json with machine info, every
        section's figures and a pass/fail per target, and a bench.md table."""
        _bench("--quick", "--only", SECTIONS, "--out", str(tmp_path))
        report = json.loads((tmp_path / "bench.json").read_text())
        assert report["quick"] is True
        machine = report["machine"]
        assert machine["cpu_model"] and machine["logical_cpus"] >= 1 and machine["cores_used"]
        res = report["results"]
        assert {
            "startup",
            "latency",
            "batch",
            "ingest",
            "watchers",
            "concurrency",
            "memory",
        } <= set(res)
        lat = res["latency"]
        for key in ("forecast", "allocate", "echo_sync_forecast_size", "echo_aio_forecast_size"):
            assert lat[key]["p50_us"] > 0 and lat[key]["p99_us"] >= lat[key]["p50_us"]
        assert lat["forecast_floor"] in ("sync", "aio") and lat["forecast_p50_ratio"] > 0
        for rpc in ("forecast", "allocate"):  # after a new sample: no cached answer
            assert lat["fresh"][rpc]["p50_us"] > 0 and lat["fresh"][f"{rpc}_p50_ratio"] > 0
        assert res["batch"]["model_sourced"] == res["batch"]["peers"] == 1000
        assert res["batch"]["max_rel_diff_vs_raw"] < 1e-4
        assert res["ingest"]["all_accepted"] is True
        assert res["ingest"]["daemon"]["samples_per_s"] > 0
        watchers = res["watchers"]  # every watcher opened, none refused, no sample rejected
        assert watchers["watchers_open"] == watchers["watchers"] == 1000
        assert watchers["watchers_failed"] == [] and watchers["all_accepted"] is True
        assert watchers["ratio"] > 0 and watchers["watched"]["samples_per_s"] > 0
        mem = res["memory"]
        assert mem["windows_full"] is True and mem["samples"] == 10 * mem["peers"]
        assert res["concurrency"]["errors"] == [] and res["concurrency"]["rejected"] == 0
        rec = res["recording"]  # every sample accepted, and recorded or counted as dropped
        assert rec["all_accepted"] is True and rec["ratio"] > 0
        lost = rec["dropped_queue_full"] + rec["dropped_write_failed"]
        assert rec["recorded"] + lost == rec["accepted_while_recording"] > 0
        names = {t["name"] for t in report["targets"]}
        assert len(names) == 7
        assert all(isinstance(t["pass"], bool) for t in report["targets"])
        md = (tmp_path / "bench.md").read_text()
        assert "python -m bench --quick" in md and "| figure |" in md
        assert "| ingest with 1,000 idle watch-all watchers |" in md
        assert "| StreamSamples ingest, recording on |" in md

    def test_merge_keeps_the_other_sections(self, tmp_path: Path) -> None:
        """--merge replaces the sections run in an existing bench.json and
        keeps the others; bench.md names the run that re-measured them."""
        first = ["--quick", "--only", "startup", "--out", str(tmp_path)]
        second = ["--quick", "--only", "recording", "--merge", "--out", str(tmp_path)]
        for args in (first, second):
            _bench(*args)
        report = json.loads((tmp_path / "bench.json").read_text())
        assert set(report["results"]) == {"startup", "recording"}
        assert "--only startup" in report["command"]
        assert report["merged"][-1]["sections"] == ["recording"]
        md = (tmp_path / "bench.md").read_text()
        assert "| start to Health SERVING (median) |" in md
        assert "| StreamSamples ingest, recording on |" in md
        assert "Re-measured by `python -m bench --quick --only recording --merge" in md


class TestProfileSummary:
    """The py-spy collapsed-stack summary."""

    def test_self_and_inclusive_shares(self, tmp_path: Path) -> None:
        """Self time goes to the leaf, inclusive time once per stack; shares
        are of all samples."""
        raw = tmp_path / "p.txt"
        raw.write_text(
            "main (a.py:1);f (a.py:5);g (a.py:9) 3\n"
            "main (a.py:1);f (a.py:6) 1\n"
            "main (a.py:1);f (a.py:5);f (a.py:7) 4\n"
        )
        s = summarize_profile(raw)
        assert s["samples"] == 8
        assert dict(s["self"]) == {"f (a.py)": 0.625, "g (a.py)": 0.375}
        assert dict(s["inclusive"])["main (a.py)"] == 1.0
        assert dict(s["inclusive"])["f (a.py)"] == 1.0


def test_mesh_pushes_send_each_peer_once_a_second() -> None:
    """The mesh row's sample schedule: every peer exactly once per second,
    spread over the ticks of the second (no tick carries more than its share)."""
    from bench.mesh import _mesh_pushes
    from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb

    peers = [f"mesh-{i:04d}" for i in range(999)]
    pushes = _mesh_pushes(peers, 100, 2, seed=0)
    assert len(pushes) == 200
    for second in range(2):
        ids = [
            s.peer_id
            for raw in pushes[second * 100 : (second + 1) * 100]
            for s in pb.PushSamplesRequest.FromString(raw).samples
        ]
        assert sorted(ids) == peers
    sizes = [len(pb.PushSamplesRequest.FromString(raw).samples) for raw in pushes]
    assert max(sizes) - min(sizes) <= 1
