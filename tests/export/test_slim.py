"""export/slim.py: the forecaster graph in fewer nodes, the same answers,
and the trained network recoverable from it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bench.harness import synthetic_windows
from bwpredd.manifest import load_manifest
from bwpredd.modeldir import load_model, session
from bwpredd.state import DEFAULT_STEP_S, STATE_LAYOUT, build_state
from export import export_model_dir
from export.__main__ import EXIT_FAILED, EXIT_OK
from export.__main__ import main as export_main
from export.slim import slim_allocator, slim_forecaster
from export.to_onnx import export_allocator, export_forecaster, op_counts
from export.verify import allocator_parity, forecaster_parity, torch_forecast
from trainer.models.forecaster import Forecaster, ForecasterConfig
from trainer.models.from_onnx import FOLDED_NORMS_KEY, RecoveryError, load_forecaster
from trainer.models.qnet import QNetConfig, QNetwork


def _trained_like(members: int = 2, seed: int = 0) -> Forecaster:
    """A forecaster whose norms are far from the identity (as after
    training: scales, shifts and running statistics of every size)."""
    torch.manual_seed(seed)
    model = Forecaster(ForecasterConfig(members=members))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.05, 4.0)
        for name, param in model.named_parameters():
            if ".norms." in name:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.4)
    return model.eval()


def _trained_like_qnet(members: int = 2, seed: int = 0) -> QNetwork:
    """A Q-network with a state standardisation and norms far from the identity."""
    torch.manual_seed(seed)
    model = QNetwork(QNetConfig(state_size=len(STATE_LAYOUT), members=members))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("state_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var") or name.endswith("state_std"):
                buf.uniform_(0.05, 4.0)
        for name, param in model.named_parameters():
            if re.search(r"\.net\.(2|6|10)\.", name):  # the norms
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.4)
    return model.eval()


def _run(data: bytes, windows: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(o, np.float64) for o in session(data).run(None, {"window": windows})]


def _publish(model: Forecaster, dest: Path, windows: np.ndarray) -> Path:
    torch.manual_seed(1)
    export_model_dir(
        model,
        QNetwork(QNetConfig(state_size=len(STATE_LAYOUT))),
        dest,
        windows=windows,
        windows_source="synthetic (test)",
        version="slim-test",
        force=True,
        timing=False,
        log=lambda _line: None,
    )
    return dest


def _replace_forecaster(model_dir: Path, data: bytes) -> None:
    """Swap a directory's forecaster graph and fix its manifest's sha256
    (as a directory exported by another version would have it)."""
    (model_dir / "forecaster.onnx").write_bytes(data)
    raw = json.loads((model_dir / "manifest.json").read_text())
    raw["forecaster"]["sha256"] = hashlib.sha256(data).hexdigest()
    (model_dir / "manifest.json").write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.ascontiguousarray(synthetic_windows(300, 3), dtype=np.float32)


class TestSlimGraph:
    @pytest.mark.parametrize("members", [1, 2])
    def test_same_answers_fewer_nodes(self, members: int, windows: np.ndarray) -> None:
        """Every norm folded, every zero state dropped, the norms'
        transposes and the shape arithmetic gone; the outputs agree with
        the graph as exported within float32 rounding, and with torch
        within export's parity tolerance."""
        model = _trained_like(members)
        raw = export_forecaster(model)
        slim, report = slim_forecaster(raw)
        ops = op_counts(slim)
        assert report.norms_folded_into_lstm == 2 * members
        assert report.norms_folded_into_gemm == members
        assert report.zero_states_dropped == 6 * members
        assert report.skipped == []
        assert report.nodes_after < report.nodes_before - 20 * members
        for gone in ("BatchNormalization", "Shape", "ConstantOfShape"):
            assert gone not in ops
        assert ops["Transpose"] == members  # the input, once per member
        assert ops["LSTM"] == 3 * members
        for before, after in zip(_run(raw, windows), _run(slim, windows), strict=True):
            np.testing.assert_allclose(after, before, rtol=2e-5, atol=1e-6)
        assert forecaster_parity(model, slim, windows).max_rel_err < 1e-4

    def test_graph_without_the_pattern_left_alone(self) -> None:
        """The allocator graph has norms that follow Gemms, not LSTMs: the
        pass leaves every node and records nothing."""
        torch.manual_seed(0)
        data = export_allocator(QNetwork(QNetConfig(state_size=len(STATE_LAYOUT))), 16)
        out, report = slim_forecaster(data)
        assert report.nodes_after == report.nodes_before
        assert report.norms_folded_into_lstm == report.norms_folded_into_gemm == 0
        assert len(report.skipped) == op_counts(data)["BatchNormalization"]
        assert op_counts(out) == op_counts(data)
        assert not onnx.load_from_string(out).metadata_props


class TestSlimAllocator:
    @pytest.mark.parametrize("members", [1, 2])
    def test_affine_steps_folded_same_actions(self, members: int, windows: np.ndarray) -> None:
        """The state's standardisation and the three norms of each member
        are folded into the Gemms after them: no Sub, Div or
        BatchNormalization left, and the graph still passes export's
        allocator parity against torch (every greedy action the same)."""
        forecaster, qnet = _trained_like(2), _trained_like_qnet(members)
        raw = export_allocator(qnet, len(STATE_LAYOUT))
        slim, report = slim_allocator(raw)
        ops = op_counts(slim)
        assert report.norms_folded_into_gemm == 4 * members and report.skipped == []
        assert report.nodes_after == report.nodes_before - 5 * members
        for gone in ("BatchNormalization", "Sub", "Div"):
            assert gone not in ops
        parity, _ = allocator_parity(qnet, slim, windows, torch_forecast(forecaster, windows))
        assert parity.action_agreement == 1.0 and parity.max_rel_err < 1e-4

    def test_forecaster_graph_left_alone(self) -> None:
        """The forecaster's norms read sequences, not a Gemm's input row:
        the allocator pass folds nothing there."""
        raw = export_forecaster(_trained_like(1))
        out, report = slim_allocator(raw)
        assert report.norms_folded_into_gemm == 0
        assert op_counts(out)["BatchNormalization"] == op_counts(raw)["BatchNormalization"]


class TestRecovery:
    def test_rebuilt_network_is_the_trained_one(self, tmp_path: Path, windows: np.ndarray) -> None:
        """An exported directory's graph is slim, and the network rebuilt
        from it for fine-tuning has the trained norms back bit for bit and
        the layers they were folded into within float32 rounding."""
        model = _trained_like(2)
        model_dir = _publish(model, tmp_path / "m", windows)
        assert (
            "BatchNormalization"
            not in load_manifest(model_dir).to_json()["export"]["op_counts"]["forecaster.onnx"]
        )
        rebuilt = load_forecaster(model_dir).model.state_dict()
        for key, want in model.state_dict().items():
            if key.endswith("num_batches_tracked"):
                continue
            got = rebuilt[key]
            if ".norms." in key:
                assert torch.equal(got, want), key
            else:
                scale = float(want.abs().max())
                assert float((got - want).abs().max()) <= 1e-5 * scale, key

    @pytest.mark.parametrize(
        "damage",
        [
            lambda e: e[0].update(into="/members.0/lstms.9/LSTM"),
            lambda e: e[0].update(norm="/somewhere/else"),
            lambda e: e[0].pop("running_var"),
            lambda e: e[0].update(epsilon=1e-3),
        ],
        ids=["unknown-layer", "not-a-norm", "missing-statistic", "other-epsilon"],
    )
    def test_damaged_record_refused(self, tmp_path: Path, windows: np.ndarray, damage) -> None:  # type: ignore[no-untyped-def]
        """A folded-norm record that does not fit the graph is a
        RecoveryError naming the metadata key, never a silently different
        network."""
        model_dir = _publish(_trained_like(1), tmp_path / "m", windows)
        proto = onnx.load(str(model_dir / "forecaster.onnx"))
        entry = next(p for p in proto.metadata_props if p.key == FOLDED_NORMS_KEY)
        records = json.loads(entry.value)
        damage(records)
        entry.value = json.dumps(records)
        _replace_forecaster(model_dir, proto.SerializeToString())
        with pytest.raises(RecoveryError, match=r"norm|epsilon"):
            load_forecaster(model_dir)


class TestSlimExistingDirectory:
    def test_cli_republishes_slim(self, tmp_path: Path, windows: np.ndarray) -> None:
        """``python -m export --slim DIR`` on a directory with the graphs as
        exported before the pass: a new version whose forecaster and
        allocator are slim and answer as before (every greedy action the
        same); a second run finds nothing to slim and writes nothing."""
        model, qnet = _trained_like(2), _trained_like_qnet(2)
        old_dir = _publish(model, tmp_path / "old", windows)
        _replace_forecaster(old_dir, export_forecaster(model))
        raw_allocator = export_allocator(qnet, len(STATE_LAYOUT))
        (old_dir / "allocator.onnx").write_bytes(raw_allocator)
        manifest = json.loads((old_dir / "manifest.json").read_text())
        manifest["allocator"]["sha256"] = hashlib.sha256(raw_allocator).hexdigest()
        (old_dir / "manifest.json").write_text(json.dumps(manifest))
        old = load_manifest(old_dir)
        new_dir = tmp_path / "new"
        args = ["--slim", str(old_dir), "--out", str(new_dir), "--parity-windows", "64"]
        assert export_main(args) == EXIT_OK
        new = load_manifest(new_dir)
        raw = new.to_json()
        assert new.version != old.version
        assert raw["export"]["provenance"]["slimmed_from"] == old.version
        for name in ("forecaster.onnx", "allocator.onnx"):
            assert "BatchNormalization" not in raw["export"]["op_counts"][name]
            assert (
                raw["export"]["slim"][name]["nodes_after"]
                < raw["export"]["slim"][name]["nodes_before"]
            )
        assert raw["parity"]["forecaster"]["max_rel_err"] < 1e-4
        assert raw["parity"]["allocator"]["greedy_action_agreement"] == 1.0
        before, after = load_model(old_dir), load_model(new_dir)
        for b, a in zip(before.run_forecaster(windows), after.run_forecaster(windows), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        point, low, high = before.run_forecaster(windows)
        states = build_state(windows, point, low, high, DEFAULT_STEP_S)
        assert np.array_equal(before.run_allocator(states), after.run_allocator(states))
        again = ["--slim", str(new_dir), "--out", str(tmp_path / "again")]
        assert export_main(again) == EXIT_FAILED
        assert not (tmp_path / "again").exists()

    def test_cli_keeps_chosen_members(self, tmp_path: Path, windows: np.ndarray) -> None:
        """``--members 1`` publishes a directory whose forecaster is member 1
        of the source's alone (its answers, the manifest saying so) with the
        allocator byte for byte; an index the forecaster lacks, or
        ``--members`` without ``--slim``, is refused and writes nothing."""
        model = _trained_like(2)
        src = _publish(model, tmp_path / "src", windows)
        out = tmp_path / "one"
        args = ["--slim", str(src), "--out", str(out), "--parity-windows", "64"]
        assert export_main([*args, "--members", "1"]) == EXIT_OK
        raw = load_manifest(out).to_json()
        assert raw["export"]["provenance"]["forecaster_members"] == {"kept": [1], "of": 2}
        alone = copy.deepcopy(model)
        alone.members = torch.nn.ModuleList([alone.members[1]])
        alone.cfg = dataclasses.replace(alone.cfg, members=1)
        want = torch_forecast(alone, windows)
        got = load_model(out).run_forecaster(windows)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(
                np.asarray(g, np.float64).reshape(-1), w[:, 0], rtol=2e-5, atol=1e-6
            )
        both = load_model(src).run_forecaster(windows)
        assert not np.allclose(both[0], got[0], rtol=1e-3)  # member 1 alone is not the pair
        assert (out / "allocator.onnx").read_bytes() == (src / "allocator.onnx").read_bytes()
        assert export_main([*args[:3], str(tmp_path / "bad"), "--members", "2"]) == EXIT_FAILED
        assert not (tmp_path / "bad").exists()
        with pytest.raises(SystemExit) as exc:
            export_main(["--run", str(tmp_path), "--members", "0"])
        assert exc.value.code == 2


class TestEmbeddedDefault:
    def test_shipped_graphs_are_slim(self) -> None:
        """The model directory the daemon falls back to went through the
        pass: no norm or shape arithmetic left in either graph, the folded
        norms recorded for retrain, and its manifest saying so."""
        from bwpredd.modeldir import DEFAULT_MODEL_DIR

        raw = load_manifest(DEFAULT_MODEL_DIR).to_json()["export"]
        for name in ("forecaster.onnx", "allocator.onnx"):
            ops = op_counts((DEFAULT_MODEL_DIR / name).read_bytes())
            for gone in ("BatchNormalization", "Shape", "ConstantOfShape"):
                assert gone not in ops, (name, gone)
            assert raw["op_counts"][name] == ops
            assert raw["slim"][name]["skipped"] == []
        proto = onnx.load(str(DEFAULT_MODEL_DIR / "forecaster.onnx"))
        records = json.loads(
            next(p.value for p in proto.metadata_props if p.key == FOLDED_NORMS_KEY)
        )
        assert len(records) == 6  # three norms in each of the two networks


class TestHandMadeGraph:
    def test_lstms_without_bias_and_state_inputs(self) -> None:
        """Two LSTMs with no bias input, zero initial states from
        ConstantOfShape and a norm between them, written by hand: the norm
        folds into a bias the second LSTM did not have, and the outputs
        agree with the graph as written."""
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        t, n, i, h1, h2 = 10, 3, 4, 6, 5

        def init(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
            return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

        inits = [
            init("W1", 1, 4 * h1, i),
            init("R1", 1, 4 * h1, h1),
            init("W2", 1, 4 * h2, h1),
            init("R2", 1, 4 * h2, h2),
            numpy_helper.from_array(rng.uniform(0.5, 2, h1).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.normal(0, 0.3, h1).astype(np.float32), "beta"),
            numpy_helper.from_array(rng.normal(0, 0.3, h1).astype(np.float32), "mu"),
            numpy_helper.from_array(rng.uniform(0.1, 3, h1).astype(np.float32), "var"),
            numpy_helper.from_array(np.array([1], np.int64), "ax1"),
            numpy_helper.from_array(np.array([1, n, h1], np.int64), "shape1"),
        ]
        zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
        nodes = [
            helper.make_node("ConstantOfShape", ["shape1"], ["h0"], value=zero),
            helper.make_node("LSTM", ["x", "W1", "R1", "", "", "h0", "h0"], ["y1"], hidden_size=h1),
            helper.make_node("Squeeze", ["y1", "ax1"], ["s1"]),
            helper.make_node("Transpose", ["s1"], ["t1"], perm=[1, 2, 0]),
            helper.make_node(
                "BatchNormalization", ["t1", "gamma", "beta", "mu", "var"], ["bn"], epsilon=1e-5
            ),
            helper.make_node("Transpose", ["bn"], ["t2"], perm=[2, 0, 1]),
            helper.make_node("LSTM", ["t2", "W2", "R2"], ["y2"], hidden_size=h2),
        ]
        nodes[4].name = "/members.0/norms.0/bn/BatchNormalization"
        nodes[6].name = "/members.0/lstms.1/LSTM"
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [t, n, i])],
            [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [t, 1, n, h2])],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        raw = model.SerializeToString()
        slim, report = slim_forecaster(raw)
        assert report.zero_states_dropped == 2 and report.norms_folded_into_lstm == 1
        ops = op_counts(slim)
        assert "BatchNormalization" not in ops and "Transpose" not in ops
        x = rng.normal(0, 1, (t, n, i)).astype(np.float32)
        (want,) = session(raw).run(None, {"x": x})
        (got,) = session(slim).run(None, {"x": x})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        records = json.loads(onnx.load_from_string(slim).metadata_props[0].value)
        assert records[0]["into"] == "/members.0/lstms.1/LSTM"
