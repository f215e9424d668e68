"""``python -m trainer eval`` on a small directory of generic-CSV traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trainer.__main__ import main
from trainer.data.synthetic import synthetic_traces
from trainer.evaluate import evaluate_traces
from trainer.models.forecaster import Forecaster, ForecasterConfig, save_checkpoint

HEADER = "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability\n"


def _write_csv(path: Path, bw: list[float], latency: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        f"{t},{b},{20 + t if latency else ''},{'0.01' if latency else ''},"
        for t, b in enumerate(bw)
    ]
    path.write_text(HEADER + "\n".join(rows) + "\n")


@pytest.fixture
def traces_dir(tmp_path: Path) -> Path:
    """Two sources: 'lab' alternates 1, 2, 1, 2 ... (hand-checkable); 'home' is noisy."""
    root = tmp_path / "traces"
    _write_csv(root / "lab" / "alt.csv", [1.0 + (t % 2) for t in range(20)], latency=True)
    rng = np.random.default_rng(0)
    for k in range(2):
        bw = (50 * np.exp(rng.normal(0, 0.3, 40))).round(3).tolist()
        _write_csv(root / "home" / f"h{k}.csv", bw, latency=False)
    return root


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """An untrained model's checkpoint (evaluation must not care how good it is)."""
    path = tmp_path / "forecaster.pt"
    save_checkpoint(Forecaster(ForecasterConfig(residual=True)).eval(), str(path), seed=0)
    return path


class TestEvalCommand:
    def test_writes_sane_json(self, traces_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
        """eval scores the model and every baseline per source and macro, and writes JSON."""
        out = tmp_path / "eval.json"
        code = main(
            ["eval", "--traces", str(traces_dir), "--model", str(checkpoint),
             "--json", str(out), "--quiet"]
        )  # fmt: skip
        assert code == 0
        res = json.loads(out.read_text())
        assert set(res["per_source"]) == {"lab", "home"}
        for source in ("lab", "home"):
            for method in ("model", "last_value", "ewma", "harmonic_mean", "mean"):
                m = res["per_source"][source][method]
                assert np.isfinite(m["nmae"]) and m["nmae"] >= 0
                assert 0.0 <= m["coverage"] <= 1.0
        assert res["per_source"]["home"]["model"]["n_windows"] == 2 * 30
        assert res["macro"]["model"]["n_sources"] == 2
        assert res["best_baseline"]["macro"]["method"] in ("last_value", "ewma", "harmonic_mean",
                                                          "mean")  # fmt: skip

    def test_baselines_match_hand_computation(
        self, traces_dir: Path, checkpoint: Path, tmp_path: Path
    ) -> None:
        """On 1, 2, 1, 2 ... last value is off by 1 and the mean of 10 by 0.5 (mean 1.5)."""
        out = tmp_path / "eval.json"
        main(["eval", "--traces", str(traces_dir), "--model", str(checkpoint),
              "--json", str(out), "--quiet"])  # fmt: skip
        lab = json.loads(out.read_text())["per_source"]["lab"]
        assert lab["last_value"]["mae"] == pytest.approx(1.0)
        assert lab["last_value"]["nmae"] == pytest.approx(1 / 1.5)
        assert lab["mean"]["nmae"] == pytest.approx(0.5 / 1.5)
        assert lab["last_value"]["acc20"] == 0.0

    def test_split_from_keeps_only_that_split(
        self, traces_dir: Path, checkpoint: Path, tmp_path: Path
    ) -> None:
        """--split-from evaluates only the files split.json lists for the test split."""
        run = tmp_path / "run"
        run.mkdir()
        split = {
            "splits": {
                "train": [],
                "val": [],
                "test": [{"source": "home", "name": "home/h1.csv", "group": "g"}],
            }
        }
        (run / "split.json").write_text(json.dumps(split))
        out = tmp_path / "eval.json"
        main(["eval", "--traces", str(traces_dir), "--model", str(checkpoint),
              "--json", str(out), "--split-from", str(run), "--quiet"])  # fmt: skip
        res = json.loads(out.read_text())
        assert set(res["per_source"]) == {"home"}
        assert res["per_source"]["home"]["model"]["n_traces"] == 1

    def test_split_seed_is_make_trains_split(
        self,
        traces_dir: Path,
        checkpoint: Path,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """--split-seed evaluates the traces that make train's split for that
        seed puts in --split (real and synthetic), and no other; a file of no
        known format is named on stderr."""
        from trainer.train_agent import training_split

        (traces_dir / "notes.bin").write_bytes(b"\x00\x01")
        want = training_split(traces_dir, 3)[1]
        capsys.readouterr()
        out = tmp_path / "eval.json"
        main(["eval", "--traces", str(traces_dir), "--model", str(checkpoint),
              "--json", str(out), "--split-seed", "3", "--split", "val", "--quiet"])  # fmt: skip
        res = json.loads(out.read_text())
        counts: dict[str, int] = {}
        for t in want:
            counts[t.source] = counts.get(t.source, 0) + 1
        got = {s: r["model"]["n_traces"] for s, r in res["per_source"].items()}
        assert got == counts
        assert "notes.bin" in capsys.readouterr().err
        with pytest.raises(SystemExit):  # one way of choosing a split at a time
            main(["eval", "--traces", str(traces_dir), "--model", str(checkpoint),
                  "--split-seed", "3", "--split-from", str(tmp_path), "--quiet"])  # fmt: skip

    def test_onnx_model_directory(self, traces_dir: Path, tmp_path: Path) -> None:
        """A model directory is scored through onnxruntime, as the daemon runs it."""
        model_dir = Path(__file__).resolve().parents[2] / "bwpredd" / "models" / "default"
        if not (model_dir / "manifest.json").exists():
            pytest.skip("no embedded default model directory")
        out = tmp_path / "eval.json"
        code = main(["eval", "--traces", str(traces_dir), "--model", str(model_dir),
                     "--json", str(out), "--quiet"])  # fmt: skip
        res = json.loads(out.read_text())
        assert code == 0 and res["model"]["kind"] == "onnx"
        assert np.isfinite(res["macro"]["model"]["nmae"])


class TestOracle:
    def test_oracle_scored_on_synthetic(self) -> None:
        """Synthetic traces get the generator's oracle, which beats last value."""
        traces = synthetic_traces(0, n_traces=4, length=200)
        res = evaluate_traces(traces, None)
        for source, r in res["per_source"].items():
            assert "oracle" in r, source
            assert r["oracle"]["mse"] < r["last_value"]["mse"]
