"""Tests for what trainer retrain is built of: the split of recordings by peer
and time, and the base forecaster rebuilt from its ONNX graph."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model, synthetic_windows
from bwpredd.schema import BW, WINDOW
from bwpredd.traces import Trace, load_traces
from tests.conftest_models import make_model_dir
from tests.recording_files import write_mesh
from trainer.__main__ import main as trainer_main
from trainer.data.synthetic import synthetic_traces
from trainer.data.windows import make_windows, split_traces, time_cuts
from trainer.evaluate import selected_traces
from trainer.models.from_onnx import MAX_REL_ERR, RecoveryError, load_forecaster

FRACTIONS = (0.6, 0.2, 0.2)


def _targets(pieces: list[Trace]) -> dict[str, list[float]]:
    """Per group, the absolute times of the samples the pieces forecast."""
    out: dict[str, list[float]] = {}
    for p in pieces:
        assert p.start_s is not None and p.time_s is not None
        t = p.start_s + p.time_s
        out.setdefault(p.group, []).extend(t[WINDOW:].tolist())
    return out


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    write_mesh(tmp_path / "fleet", ("node-a", "node-b"), peers=2, steps=200)
    return tmp_path / "fleet"


class TestTimeSplit:
    """Recordings are split by peer and by time."""

    def test_most_recent_part_is_test(self, fleet: Path) -> None:
        """Every peer is in every split; its test targets are exactly its
        samples at or after the test cut (the last 20% of its span), its
        validation ones the 20% before, and no sample is a target twice."""
        traces = load_traces(fleet).traces
        cuts = time_cuts(traces, FRACTIONS)
        train, val, test = split_traces(traces, FRACTIONS, cuts=cuts)
        groups = {t.group for t in traces}
        assert len(groups) == 4
        per_split = [_targets(part) for part in (train, val, test)]
        for g in groups:
            (tr,) = [t for t in traces if t.group == g]
            assert tr.start_s is not None and tr.time_s is not None
            t_all = tr.start_s + tr.time_s
            lo, hi = t_all[0], t_all[-1]
            val_from, test_from = cuts[g]
            assert val_from == pytest.approx(lo + 0.6 * (hi - lo))
            assert test_from == pytest.approx(lo + 0.8 * (hi - lo))
            tr_t, va_t, te_t = (np.asarray(s[g]) for s in per_split)
            np.testing.assert_array_equal(te_t, t_all[t_all >= test_from])
            np.testing.assert_array_equal(va_t, t_all[(t_all >= val_from) & (t_all < test_from)])
            assert tr_t.max() < val_from
            everything = np.concatenate([tr_t, va_t, te_t])
            assert len(np.unique(everything)) == len(everything) == len(t_all) - WINDOW

    def test_test_piece_carries_history_not_targets(self, fleet: Path) -> None:
        """A test piece starts WINDOW samples before its cut: its first window
        is the last one of validation's samples, its first target the first
        test sample."""
        traces = load_traces(fleet).traces
        _, _, test = split_traces(traces, FRACTIONS)
        piece = test[0]
        (whole,) = [t for t in traces if t.group == piece.group]
        k = int(np.argmax(whole.data[:, BW] == piece.data[WINDOW, BW]))
        np.testing.assert_array_equal(piece.data, whole.data[k - WINDOW :])
        w = make_windows([piece])
        np.testing.assert_array_equal(w.x[0], whole.data[k - WINDOW : k])

    def test_public_traces_still_split_by_group(self, fleet: Path) -> None:
        """Traces without absolute time are split by fold group as before,
        whole, next to recordings split by time."""
        syn = synthetic_traces(0, n_traces=6, length=60)
        train, val, test = split_traces(syn + load_traces(fleet).traces, FRACTIONS)
        alone = split_traces(syn, FRACTIONS)
        for mixed, only in zip((train, val, test), alone, strict=True):
            assert [t.name for t in mixed if t.start_s is None] == [t.name for t in only]

    def test_split_from_a_run_keeps_its_cuts(self, fleet: Path, tmp_path: Path) -> None:
        """trainer eval --split-from applies the run's cuts: samples recorded
        after the run are test, never train."""
        traces = load_traces(fleet).traces
        cuts = time_cuts(traces, FRACTIONS)
        record = {
            "splits": {"train": [], "val": [], "test": []},
            "time_cuts": {g: list(c) for g, c in cuts.items()},
        }
        run = tmp_path / "run"
        run.mkdir()
        (run / "split.json").write_text(json.dumps(record))
        write_mesh(fleet, ("node-a",), peers=1, steps=100, start=1.7e9 + 1000, seed=5)
        args = argparse.Namespace(traces=fleet, split_from=run, quiet=True)
        got = {
            split: _targets(selected_traces(argparse.Namespace(**vars(args), split=split))[0])
            for split in ("train", "val", "test")
        }
        late = got["test"]["node-a/node-a-peer-0"]
        assert max(late) >= 1.7e9 + 1000
        assert max(got["train"]["node-a/node-a-peer-0"]) < cuts["node-a/node-a-peer-0"][0]
        assert set(got["test"]) == set(cuts)


class TestFromOnnx:
    """The base forecaster back in PyTorch from a model directory."""

    def test_default_model_rebuilt_matches_onnxruntime(self) -> None:
        """The embedded default's weights rebuild its two-member residual
        forecaster; torch and onnxruntime agree on unseen windows."""
        got = load_forecaster(DEFAULT_MODEL_DIR)
        assert got.model.cfg.members == 2 and got.model.cfg.residual
        assert got.parity["max_rel_err"] <= MAX_REL_ERR
        x = synthetic_windows(256, seed=7)
        want = load_model(DEFAULT_MODEL_DIR).run_forecaster(x)
        with torch.no_grad():
            point, low, high = (t.numpy()[:, 0] for t in got.model(torch.from_numpy(x)))
        for g, w in zip((point, low, high), want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-3)

    def test_plain_head_model_rebuilt(self, tmp_path: Path) -> None:
        """A one-member forecaster without the residual (make_model_dir's)
        is found out by the parity check and rebuilt too."""
        model_dir = make_model_dir(tmp_path / "m", seed=3)
        got = load_forecaster(model_dir)
        assert got.model.cfg.members == 1 and not got.model.cfg.residual
        assert got.parity["max_rel_err"] <= MAX_REL_ERR

    def test_graph_its_weights_do_not_explain_is_refused(self, tmp_path: Path) -> None:
        """A graph that does more than the weights say (the point forecast
        doubled inside it) fails the parity check instead of being trusted."""
        model_dir = make_model_dir(tmp_path / "m", seed=3, forecast_scale=2.0)
        with pytest.raises(RecoveryError, match="do not rebuild"):
            load_forecaster(model_dir)


class TestRetrainInput:
    """trainer retrain refuses input it cannot learn from, naming why."""

    def _run(self, tmp_path: Path, *dirs: Path) -> int:
        args = ["retrain", "--recordings", *map(str, dirs), "--base", str(DEFAULT_MODEL_DIR)]
        args += ["--epochs", "1", "--steps-per-epoch", "2", "--agent-episodes", "2", "--quick"]
        return trainer_main([*args, "--out", str(tmp_path / "run"), "--quiet"])

    def test_no_recordings(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A directory without recordings is a usage error."""
        (tmp_path / "empty").mkdir()
        assert self._run(tmp_path, tmp_path / "empty") == 2
        assert "no usable recordings" in capsys.readouterr().err

    def test_too_short_to_split(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """Peers whose oldest 60% is no longer than a window say so."""
        write_mesh(tmp_path / "fleet", ("node-a",), peers=1, steps=15)
        assert self._run(tmp_path, tmp_path / "fleet") == 2
        assert "record longer" in capsys.readouterr().err

    def test_a_node_given_twice(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """The same node's recordings under two --recordings directories."""
        write_mesh(tmp_path / "a", ("node-a",), peers=1, steps=40)
        write_mesh(tmp_path / "b", ("node-a",), peers=1, steps=40, seed=1)
        assert self._run(tmp_path, tmp_path / "a", tmp_path / "b") == 2
        assert "give each node's recordings once" in capsys.readouterr().err

    def test_bad_budget_named(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A learning rate that is not positive is refused, naming the flag."""
        args = ["retrain", "--recordings", str(tmp_path), "--base", str(DEFAULT_MODEL_DIR)]
        assert trainer_main([*args, "--out", str(tmp_path / "run"), "--lr", "0"]) == 2
        assert "--lr: must be > 0, got 0.0" in capsys.readouterr().err
