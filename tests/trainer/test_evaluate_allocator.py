"""``python -m trainer eval-allocator`` on a small directory of generic CSVs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bwpredd.state import STATE_LAYOUT
from trainer import evaluate_allocator
from trainer.evaluate_allocator import HEURISTICS, gap_closure, nearest_level
from trainer.models.qnet import QNetConfig, QNetwork, save_checkpoint

HEADER = "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability"


def write_csvs(root: Path) -> Path:
    """Two sources of two generic CSV traces each; one leaves latency empty."""
    rng = np.random.default_rng(0)
    for source, scale in (("lab_a", 5.0), ("lab_b", 400.0)):
        d = root / source
        d.mkdir(parents=True)
        for k in range(2):
            bw = scale * np.exp(np.cumsum(rng.normal(0, 0.2, 120)))
            lines = [HEADER]
            for t, b in enumerate(bw):
                lat = "" if k == 1 else f"{30 + rng.uniform(0, 5):.2f}"
                lines.append(f"{t}.0,{b:.4f},{lat},0,1")
            (d / f"trace{k}.csv").write_text("\n".join(lines) + "\n")
    return root


def run_cli(traces: Path, model: Path, out: Path) -> int:
    parser = argparse.ArgumentParser()
    evaluate_allocator.add_arguments(parser)
    args = parser.parse_args(
        ["--traces", str(traces), "--model", str(model), "--json", str(out), "--segment", "50"]
    )
    return int(args.func(args))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = QNetwork(QNetConfig(state_size=len(STATE_LAYOUT)))
    path = tmp_path / "model" / "allocator.pt"
    path.parent.mkdir()
    save_checkpoint(model, str(path), state_layout=list(STATE_LAYOUT), seed=0)
    return path


class TestEvalAllocatorCLI:
    def test_writes_json_with_every_policy(self, tmp_path: Path, checkpoint: Path) -> None:
        """The JSON has the DDQN, the oracle and every heuristic, macro and per source."""
        traces = write_csvs(tmp_path / "traces")
        out = tmp_path / "eval.json"
        assert run_cli(traces, checkpoint, out) == 0
        doc = json.loads(out.read_text())
        pol = doc["policies"]
        assert {"ddqn", "oracle", *HEURISTICS} <= set(pol)
        assert all(-1.0 <= r <= 1.0 for r in pol.values())
        assert pol["oracle"] >= max(pol[h] for h in HEURISTICS)
        for key in ("utilisation", "queue_share", "loss_share"):
            assert set(doc[key]) == set(pol)
        assert set(doc["per_source"]) == {"lab_a", "lab_b"}
        # Every step after the first window is scored: 2 traces x (120 - 10).
        assert doc["per_source"]["lab_a"]["ddqn"]["steps"] == 220
        assert "gap_closure" in doc and "best_heuristic" in doc
        macro = np.mean([doc["per_source"][s]["ddqn"]["reward"] for s in ("lab_a", "lab_b")])
        assert pol["ddqn"] == pytest.approx(macro)

    def test_model_directory_runs_through_onnxruntime(
        self, tmp_path: Path, checkpoint: Path
    ) -> None:
        """A published model directory is scored via onnxruntime like the torch checkpoint."""
        pytest.importorskip("onnx")
        from tests.conftest_models import make_model_dir

        model_dir = make_model_dir(tmp_path / "published", seed=0)
        traces = write_csvs(tmp_path / "traces")
        out = tmp_path / "eval.json"
        assert run_cli(traces, model_dir, out) == 0
        doc = json.loads(out.read_text())
        assert "onnxruntime" in doc["model"]
        assert {"ddqn", "oracle", "forecast", "conservative"} <= set(doc["policies"])

    def test_missing_traces_is_an_error(self, tmp_path: Path, checkpoint: Path) -> None:
        """A missing traces directory exits non-zero without writing JSON."""
        out = tmp_path / "eval.json"
        assert run_cli(tmp_path / "nope", checkpoint, out) != 0
        assert not out.exists()


class TestHelpers:
    def test_nearest_level(self) -> None:
        """Fractions map to the nearest of the ten levels, clamped at both ends."""
        got = nearest_level(np.array([0.0, 0.14, 0.16, 0.5, 0.94, 3.0]))
        assert got.tolist() == [0, 0, 1, 4, 8, 9]

    def test_gap_closure(self) -> None:
        """Gap closure is (ddqn - best heuristic) / (oracle - best heuristic)."""
        best, ratio = gap_closure(
            {"ddqn": 0.7, "oracle": 0.9, "conservative": 0.6, "fixed_50": 0.5}
        )
        assert best == "conservative"
        assert ratio == pytest.approx(1 / 3)
