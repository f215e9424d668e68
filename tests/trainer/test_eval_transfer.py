"""eval-transfer and the horizon model's training (issue 16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model
from bwpredd.traces import load_traces
from tests.conftest_models import make_model_dir
from tests.helpers import write_csv_traces
from trainer.eval_transfer import actual_seconds, cumulative, mean_over
from trainer.models.horizon import HorizonConfig, HorizonNet, load_checkpoint

HEADER = "time_s,bandwidth_mbps,latency_ms,packet_loss,reliability\n"


def write_trace(path: Path, bw: list[float] | np.ndarray, step: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i * step},{b},,,\n" for i, b in enumerate(bw))
    path.write_text(HEADER + rows)


@pytest.fixture
def known_dir(tmp_path: Path) -> Path:
    """Two generic-CSV sources whose true times are known: a flat 8 Mbit/s
    link (every transfer takes exactly d), and one that doubles from 10 to
    20 Mbit/s after t = 150 s."""
    root = tmp_path / "traces"
    write_trace(root / "flat" / "a.csv", [8.0] * 300)
    write_trace(root / "step" / "b.csv", [10.0] * 151 + [20.0] * 149)
    return root


class TestIntegration:
    """The actual times integrate the trace from the point on."""

    def test_actual_times_known(self, known_dir: Path) -> None:
        """Flat: d seconds; across the step: 11 s at 10 then 4.5 s at 20."""
        traces = {t.source: t for t in load_traces(known_dir).traces}
        edges, mbit = cumulative(traces["flat"])
        k = np.array([9, 100, 200])
        got = actual_seconds(edges, mbit, k, np.full(3, 8.0 * 20))
        assert got == pytest.approx([20.0, 20.0, 20.0])
        assert np.isnan(actual_seconds(edges, mbit, np.array([290]), np.array([8.0 * 20]))[0])
        edges, mbit = cumulative(traces["step"])
        assert actual_seconds(edges, mbit, np.array([139]), np.array([200.0]))[0] == (
            pytest.approx(15.5)
        )
        mean = mean_over(edges, mbit, np.array([140]), np.array([10.0, 20.0, 1000.0]))
        assert mean[0, 0] == pytest.approx(10.0)
        assert mean[0, 1] == pytest.approx(15.0)
        assert np.isnan(mean[0, 2])


class TestEvalTransferCommand:
    """python -m trainer eval-transfer."""

    def test_known_times(self, known_dir: Path, tmp_path: Path) -> None:
        """On the flat link every constant rate is exact (error 0, the zero-width
        interval covering), the model is close, and the JSON has every d."""
        from trainer.__main__ import main

        out = tmp_path / "out.json"
        code = main(["eval-transfer", "--traces", str(known_dir), "--model",
                     str(DEFAULT_MODEL_DIR), "--json", str(out), "--quiet",
                     "--reports", str(tmp_path / "reports")])  # fmt: skip
        assert code == 0
        res = json.loads(out.read_text())
        assert set(res["durations"]) == {"5", "20", "60"}
        for entry in res["durations"].values():
            flat = entry["per_source"]["flat"]
            for name in ("last_value", "ewma", "mean"):
                assert flat[name]["err"] == pytest.approx(0.0, abs=1e-6)
            assert flat["last_value"]["coverage"] == 1.0
            assert flat["today"]["err"] < 0.01  # the LSTM's next step on a flat window
            assert flat["model"]["err"] < 0.1
            assert set(entry["macro"]) >= {"model", "today", "last_value", "ewma", "mean"}
            assert entry["best_constant"]["method"] in ("last_value", "ewma", "mean")
        # d = 60 needs 120 s of trace after the point: fewer points than d = 5.
        assert res["durations"]["60"]["points"] < res["durations"]["5"]["points"]
        md = (tmp_path / "reports" / "transfer.md").read_text()
        assert "| d (s) | sources | today's rule |" in md
        assert (tmp_path / "reports" / "transfer_times.png").stat().st_size > 0


class TestTrainAndExport:
    """train-transfer on a tiny directory, then the graph into a model directory."""

    def test_quick_train_then_add_to_model_dir(self, tmp_path: Path) -> None:
        """A quick run writes horizon.pt with calibrated shifts and transfer.md;
        export --add-horizon-to publishes a directory that loads with horizons,
        the other graphs byte for byte, a new version, and matches torch."""
        from export.__main__ import main as export_main
        from trainer.__main__ import main

        root = write_csv_traces(tmp_path / "traces", length=400)
        run = tmp_path / "run"
        code = main(["train-transfer", "--traces", str(root), "--out", str(run), "--quick",
                     "--quiet"])  # fmt: skip
        assert code == 0
        model, ckpt = load_checkpoint(str(run / "horizon.pt"))
        assert ckpt["calibration"]["horizons"] == list(model.cfg.horizons)
        assert (run / "reports" / "transfer.md").exists()
        base = make_model_dir(tmp_path / "base", version="test-base")
        dest = tmp_path / "with"
        code = export_main(["--run", str(run), "--add-horizon-to", str(base), "--out",
                            str(dest), "--parity-windows", "64"])  # fmt: skip
        assert code == 0
        loaded = load_model(dest)
        assert loaded.horizon is not None and loaded.version != "test-base"
        for name in ("forecaster.onnx", "allocator.onnx"):
            assert (dest / name).read_bytes() == (base / name).read_bytes()
        w = np.abs(np.random.default_rng(0).normal(20, 5, size=(8, 10, 4))).astype(np.float32)
        step = np.full(8, 2.0, np.float32)
        got = loaded.run_horizon(w, step)
        with torch.no_grad():
            ref = model(torch.from_numpy(w), torch.from_numpy(step[:, None]))
        for g, r in zip(got, ref, strict=True):
            assert np.allclose(g, r.numpy(), rtol=1e-4)

    def test_members_average(self) -> None:
        """Two networks merged average their log quantiles."""
        torch.manual_seed(0)
        a, b = HorizonNet(HorizonConfig()), HorizonNet(HorizonConfig())
        both = HorizonNet.merge([a, b])
        w = torch.rand(4, 10, 4) * 50
        s = torch.ones(4, 1)
        _, ma, _, _ = a.log_quantiles(w, s)
        _, mb, _, _ = b.log_quantiles(w, s)
        _, mm, _, _ = both.log_quantiles(w, s)
        assert torch.allclose(mm, (ma + mb) / 2, atol=1e-6)


def test_examples_trace_balance_weighs_traces_alike(tmp_path: Path) -> None:
    from trainer.train_transfer import examples

    d = tmp_path / "traces"
    rng = np.random.default_rng(3)
    write_trace(d / "oboe" / "long.csv", rng.uniform(1, 10, 300))
    write_trace(d / "oboe" / "short.csv", rng.uniform(1, 10, 40))
    traces = list(load_traces(d, progress=False).traces)
    assert len(traces) == 2
    by_window = examples(traces, (1.0, 4.0))
    by_trace = examples(traces, (1.0, 4.0), trace_balance=True)
    names = np.repeat([t.name for t in traces], [min(400, len(t) - 10) for t in traces])
    for ex in (by_window, by_trace):
        assert ex.weight.sum() == pytest.approx(1.0)
    share = {n: by_trace.weight[names == n].sum() for n in np.unique(names)}
    assert list(share.values()) == pytest.approx([0.5, 0.5])
    # Without it the long trace weighs by its windows.
    long_share = max(by_window.weight[names == n].sum() for n in np.unique(names))
    assert long_share > 0.8
