"""Tests for bwpredd.checkmodel: offline validation of a model directory."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bwpredd.checkmodel import EXIT_INVALID, EXIT_OK, check_model_dir, main
from bwpredd.state import STATE_LAYOUT
from export import DEFAULT_MODEL_DIR, ExportError
from export.to_onnx import export_allocator, export_forecaster
from tests.conftest_models import ScaledForecaster, make_model_dir
from trainer.models.forecaster import Forecaster
from trainer.models.qnet import QNetConfig, QNetwork

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid model dir from the test helper (never modified by the tests)."""
    return make_model_dir(tmp_path_factory.mktemp("good") / "m", version="test-good")


@pytest.fixture
def model_copy(good_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the valid dir that a test may break."""
    return Path(shutil.copytree(good_dir, tmp_path / "m"))


def _rewrite_manifest(model_dir: Path, **changes: object) -> None:
    raw = json.loads((model_dir / "manifest.json").read_text())
    raw.update(changes)
    (model_dir / "manifest.json").write_text(json.dumps(raw))


class TestCheckModel:
    def test_embedded_default_passes(self, capsys: pytest.CaptureFixture[str]) -> None:
        """check-model on bwpredd/models/default exits 0 with a one-line OK summary."""
        assert main([str(DEFAULT_MODEL_DIR)]) == EXIT_OK
        out = capsys.readouterr().out.strip()
        assert out.startswith("OK ") and "version" in out and "\n" not in out

    def test_good_dir_reports_version_files_timings(self, good_dir: Path) -> None:
        """A good dir gives ok with its version, both file sizes and timings."""
        result = check_model_dir(good_dir)
        assert result.ok, result.reason
        assert result.version == "test-good"
        assert set(result.files) == {"forecaster.onnx", "allocator.onnx"}
        assert all(v > 0 for v in result.files.values())
        assert {"load", "forecast_batch64", "allocate_batch64"} <= set(result.timings_ms)

    def test_flipped_byte_fails_sha256(
        self, model_copy: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One flipped byte in forecaster.onnx fails with a sha256 reason and exit 1."""
        path = model_copy / "forecaster.onnx"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        assert main([str(model_copy)]) == EXIT_INVALID
        err = capsys.readouterr().err
        assert "sha256" in err and "forecaster.onnx" in err
        assert not check_model_dir(model_copy).ok

    def test_wrong_output_shape_fails(self, model_copy: Path) -> None:
        """A graph whose q_values are [N, 9] under a manifest saying [N, 10] is refused."""
        torch.manual_seed(0)
        data = export_allocator(
            QNetwork(QNetConfig(state_size=len(STATE_LAYOUT), n_actions=9)), len(STATE_LAYOUT)
        )
        (model_copy / "allocator.onnx").write_bytes(data)
        raw = json.loads((model_copy / "manifest.json").read_text())
        raw["allocator"]["sha256"] = hashlib.sha256(data).hexdigest()
        (model_copy / "manifest.json").write_text(json.dumps(raw))
        result = check_model_dir(model_copy)
        assert not result.ok
        assert "q_values" in result.reason and "[N, 9]" in result.reason

    def test_missing_manifest_field_fails(self, model_copy: Path) -> None:
        """A manifest missing its interval is refused by the schema."""
        raw = json.loads((model_copy / "manifest.json").read_text())
        del raw["interval"]
        (model_copy / "manifest.json").write_text(json.dumps(raw))
        result = check_model_dir(model_copy)
        assert not result.ok and "interval" in result.reason

    def test_missing_file_fails(self, model_copy: Path) -> None:
        """A missing allocator.onnx is reported by name."""
        (model_copy / "allocator.onnx").unlink()
        result = check_model_dir(model_copy)
        assert not result.ok and "allocator.onnx" in result.reason

    def test_unloadable_onnx_fails(self, model_copy: Path) -> None:
        """Bytes that match their sha256 but are not ONNX fail at load, not earlier."""
        junk = b"not an onnx model" * 10
        (model_copy / "forecaster.onnx").write_bytes(junk)
        raw = json.loads((model_copy / "manifest.json").read_text())
        raw["forecaster"]["sha256"] = hashlib.sha256(junk).hexdigest()
        (model_copy / "manifest.json").write_text(json.dumps(raw))
        result = check_model_dir(model_copy)
        assert not result.ok and "cannot load" in result.reason

    def test_wrong_input_name_fails(self, model_copy: Path) -> None:
        """A manifest that names an output the graph does not have is refused."""
        raw = json.loads((model_copy / "manifest.json").read_text())
        raw["forecaster"]["outputs"].append(
            {"name": "extra", "shape": [None, 1], "dtype": "float32"}
        )
        (model_copy / "manifest.json").write_text(json.dumps(raw))
        result = check_model_dir(model_copy)
        assert not result.ok and "outputs" in result.reason and "extra" in result.reason

    def test_inverted_interval_fails_smoke(self, model_copy: Path) -> None:
        """A graph whose interval comes out inverted fails the smoke inference."""
        torch.manual_seed(0)
        data = export_forecaster(ScaledForecaster(Forecaster(), -1.0))
        (model_copy / "forecaster.onnx").write_bytes(data)
        raw = json.loads((model_copy / "manifest.json").read_text())
        raw["forecaster"]["sha256"] = hashlib.sha256(data).hexdigest()
        (model_copy / "manifest.json").write_text(json.dumps(raw))
        result = check_model_dir(model_copy)
        assert not result.ok and "interval out of order" in result.reason

    def test_export_refuses_what_check_model_refuses(self, tmp_path: Path) -> None:
        """The export's own final check stops an inverted-interval model from publishing."""
        with pytest.raises(ExportError, match="interval out of order"):
            make_model_dir(tmp_path / "neg", forecast_scale=-1.0)
        assert not (tmp_path / "neg").exists()
        assert list(tmp_path.iterdir()) == []

    def test_no_directory(self, tmp_path: Path) -> None:
        """A path without a manifest fails and names the missing manifest."""
        result = check_model_dir(tmp_path / "nowhere")
        assert not result.ok and "manifest.json" in result.reason

    def test_does_not_import_torch(self) -> None:
        """bwpredd.checkmodel runs without importing torch or onnx."""
        code = (
            "import sys; from bwpredd.checkmodel import main; rc = main([sys.argv[1]]); "
            "bad = [m for m in ('torch', 'onnx', 'trainer') if m in sys.modules]; "
            "sys.exit(3 if bad else rc)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, str(DEFAULT_MODEL_DIR)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
