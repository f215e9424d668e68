"""Engine and the in-process Predictor on real ONNX files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bwpredd import Predictor
from bwpredd._proto.bwpred.v1 import bwpred_pb2 as pb
from bwpredd.engine import SOURCE_LABELS, Engine, Source
from bwpredd.errors import ModelError
from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model, smoke_windows
from bwpredd.state import build_state, reference_capacity


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.load()


class TestLoad:
    """Model directories are verified before use."""

    def test_default_loads(self) -> None:
        """The embedded default verifies, loads and names its version."""
        model = load_model(DEFAULT_MODEL_DIR)
        assert model.version and set(model.sha256) == {
            "forecaster.onnx",
            "allocator.onnx",
            "horizon.onnx",
        }

    def test_flipped_byte_refused(self, tmp_path: Path) -> None:
        """One flipped byte in an ONNX file fails the sha256 check."""
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        blob = bytearray((d / "forecaster.onnx").read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        (d / "forecaster.onnx").write_bytes(bytes(blob))
        with pytest.raises(ModelError, match="sha256 mismatch"):
            load_model(d)

    def test_missing_file_refused(self, tmp_path: Path) -> None:
        """A missing ONNX file is refused naming it."""
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        (d / "allocator.onnx").unlink()
        with pytest.raises(ModelError, match=r"allocator\.onnx"):
            load_model(d)

    def test_other_state_layout_refused(self, tmp_path: Path) -> None:
        """A model trained on another state layout, even of the same width,
        is refused naming state_layout."""
        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        doc = json.loads((d / "manifest.json").read_text())
        doc["state_layout"] = doc["state_layout"][::-1]
        (d / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(ModelError, match="state_layout"):
            load_model(d)

    def test_daemon_and_check_model_share_the_rules(self, tmp_path: Path) -> None:
        """What check-model refuses the daemon refuses, with the same reason:
        here a manifest whose output dtype is not the graph's (which the
        daemon's own, looser checks once let through)."""
        from bwpredd.checkmodel import check_model_dir

        d = tmp_path / "m"
        shutil.copytree(DEFAULT_MODEL_DIR, d)
        doc = json.loads((d / "manifest.json").read_text())
        doc["forecaster"]["outputs"][0]["dtype"] = "float64"
        (d / "manifest.json").write_text(json.dumps(doc))
        with pytest.raises(ModelError, match="is float32, the manifest says float64") as err:
            load_model(d)
        result = check_model_dir(d)
        assert not result.ok and result.reason == err.value.reason


class TestEngine:
    """Sources and intervals."""

    def test_sources(self) -> None:
        """Full windows get MODEL, short ones COLD_START, and without a model FALLBACK."""
        model = load_model(DEFAULT_MODEL_DIR)
        w = smoke_windows(4)
        counts = np.array([10, 10, 3, 1])
        fc = Engine(model).forecast(w, counts)
        assert fc.source.tolist() == [Source.MODEL] * 2 + [Source.BASELINE_COLD_START] * 2
        assert (fc.low <= fc.point).all() and (fc.point <= fc.high).all()
        none = Engine(None).forecast(w, counts)
        assert (
            none.source.tolist()
            == [Source.BASELINE_FALLBACK] * 2 + [Source.BASELINE_COLD_START] * 2
        )
        assert none.model_version == ""

    def test_source_is_the_protos(self) -> None:
        """Source's names and values are bwpred.v1.ForecastSource's (less
        its prefix and UNSPECIFIED), and its labels are the metric label
        values operators query."""
        proto = {
            name.removeprefix("FORECAST_SOURCE_"): value
            for name, value in pb.ForecastSource.items()
            if value != pb.FORECAST_SOURCE_UNSPECIFIED
        }
        assert {s.name: s.value for s in Source} == proto
        assert SOURCE_LABELS == {1: "model", 2: "baseline_cold_start", 3: "baseline_fallback"}

    def test_forced_baseline(self) -> None:
        """force_baseline answers the chosen peers from the baseline even with a model."""
        fc = Engine(load_model(DEFAULT_MODEL_DIR)).forecast(
            smoke_windows(2), np.array([10, 10]), force_baseline=np.array([True, False])
        )
        assert fc.source.tolist() == [Source.BASELINE_FALLBACK, Source.MODEL]
        assert fc.point[0] == pytest.approx(fc.baseline[0])


class TestPredictor:
    """The in-process API."""

    def test_single_and_batch(self, predictor: Predictor) -> None:
        """One [10,4] window gives a float; a batch gives [N]; both agree."""
        w = smoke_windows(5)
        batch = predictor.predict_bandwidth(w)
        assert isinstance(batch, np.ndarray) and batch.shape == (5,)
        one = predictor.predict_bandwidth(w[2])
        assert isinstance(one, float) and one == pytest.approx(float(batch[2]), rel=1e-5)
        fc = predictor.forecast(w)
        assert (fc.low_mbps <= fc.bandwidth_mbps).all() and (
            fc.bandwidth_mbps <= fc.high_mbps
        ).all()

    def test_bad_shapes(self, predictor: Predictor) -> None:
        """Windows of the wrong shape or with NaN are refused naming the rule."""
        with pytest.raises(ValueError, match="shape"):
            predictor.predict_bandwidth(np.zeros((9, 4)))
        w = smoke_windows(1)
        w[0, 0, 1] = np.nan
        with pytest.raises(ValueError, match="finite"):
            predictor.forecast(w)

    def test_allocation_matches_state_builder(self, predictor: Predictor) -> None:
        """decide_allocation equals the argmax of the allocator on build_state
        of the same window and forecast, and is deterministic."""
        w = smoke_windows(6)
        actions = predictor.decide_allocation(w, step_s=0.5)
        model = predictor.engine.model
        assert model is not None
        p, lo, hi = model.run_forecaster(w)
        expected = model.run_allocator(build_state(w, p, lo, hi, 0.5))
        np.testing.assert_array_equal(actions, expected)
        np.testing.assert_array_equal(predictor.decide_allocation(w, step_s=0.5), actions)
        with pytest.raises(ValueError, match="step_s"):
            predictor.decide_allocation(w, step_s=0.0)
        assert predictor.allocation_percent(int(actions[0])) == (int(actions[0]) + 1) * 10
        assert reference_capacity(w).shape == (6,)


class TestManifest:
    """The manifest round trip."""

    def test_round_trip_equals_file(self) -> None:
        """from_json then to_json gives back exactly the JSON of the embedded default."""
        from bwpredd.manifest import Manifest

        raw = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
        assert Manifest.from_json(raw).to_json() == raw


# -- malformed manifests (issue 14, item 7) ---------------------------------------------

_FREE_FORM = ("evaluation", "training_data", "export", "parity")


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key or index path of a decoded manifest, free-form sections as one."""
    out = [prefix] if prefix else []
    if prefix and prefix[0] in _FREE_FORM:
        return out
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


_DEFAULT_MANIFEST = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(alphabet=st.characters(codec="utf-8"), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _mutated(path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    doc = copy.deepcopy(_DEFAULT_MANIFEST)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, d)
    return d


class TestMalformedManifest:
    """Whatever a manifest holds, loading it gives a model or a ModelError."""

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        path=st.sampled_from(_paths(_DEFAULT_MANIFEST)),
        value=_JSON_VALUES,
        delete=st.booleans(),
    )
    def test_mutations_load_or_model_error(
        self, fuzz_dir: Path, path: tuple[Any, ...], value: Any, delete: bool
    ) -> None:
        """One field of the real manifest replaced (or deleted): load_model
        returns a model or raises ModelError, never anything else."""
        (fuzz_dir / "manifest.json").write_text(json.dumps(_mutated(path, value, delete)))
        try:
            model = load_model(fuzz_dir)
        except ModelError as exc:
            assert str(exc).startswith(str(fuzz_dir))
        else:
            assert model.version

    @settings(max_examples=100, deadline=None)
    @given(blob=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
    def test_garbage_bytes_model_error(self, fuzz_dir: Path, blob: bytes) -> None:
        """A manifest.json of arbitrary bytes is a ModelError."""
        (fuzz_dir / "manifest.json").write_bytes(blob)
        with pytest.raises(ModelError):
            load_model(fuzz_dir)

    def test_unusable_directory_name_model_error(self) -> None:
        """A model directory whose name the OS cannot take (a NUL) is a ModelError."""
        with pytest.raises(ModelError, match="null"):
            load_model(Path("/tmp/model\0dir"))
