"""Tests for the export package: checkpoint -> verified, published model dir."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.harness import synthetic_windows
from bwpredd.errors import ManifestError
from bwpredd.manifest import Manifest, load_manifest, verify_files
from bwpredd.modeldir import load_model
from bwpredd.state import STATE_LAYOUT
from export import ExportError, copy_model_dir, export_model_dir, publish_dir
from export.__main__ import main as export_main
from export.quantize import try_int8
from export.to_onnx import export_forecaster
from export.verify import ParityError, forecaster_parity, torch_forecast
from tests.conftest_models import make_model_dir
from trainer.models import forecaster as fmod
from trainer.models import qnet


def _fresh_run(run: Path, *, seed: int = 0, allocator: bool = True) -> Path:
    """A run dir holding checkpoints of freshly initialised models."""
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fmod.save_checkpoint(
        fmod.Forecaster(),
        str(run / "forecaster.pt"),
        metrics={"val_nmae": 0.5},
        training_data={"traces": 3, "windows": 123},
        seed=seed,
    )
    if allocator:
        qnet.save_checkpoint(
            qnet.QNetwork(qnet.QNetConfig(state_size=len(STATE_LAYOUT))),
            str(run / "allocator.pt"),
            metrics={"mean_reward": 0.1},
            state_layout=list(STATE_LAYOUT),
            seed=seed,
        )
    return run


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    """One ``python -m export`` run on a tiny checkpoint, with real trace windows."""
    base = tmp_path_factory.mktemp("cli")
    run = _fresh_run(base / "run")
    out = base / "models" / "v1"
    rc = export_main(
        ["--run", str(run), "--out", str(out), "--version", "v1", "--parity-windows", "256"]
    )
    return rc, run, out


@pytest.fixture(scope="module")
def helper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir from the test helper."""
    return make_model_dir(tmp_path_factory.mktemp("helper") / "m", version="test-1")


class TestExportRoundTrip:
    def test_cli_exports_a_loadable_directory(self, cli_export: tuple[int, Path, Path]) -> None:
        """python -m export on a tiny checkpoint exits 0 and publishes a dir that loads."""
        rc, _, out = cli_export
        assert rc == 0
        manifest = load_manifest(out)
        assert manifest.version == "v1"
        assert set(verify_files(out, manifest)) == {"forecaster.onnx", "allocator.onnx"}
        assert sorted(p.name for p in out.iterdir()) == [
            "allocator.onnx",
            "forecaster.onnx",
            "manifest.json",
        ]
        assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]

    def test_parity_recorded_within_tolerance(self, cli_export: tuple[int, Path, Path]) -> None:
        """The manifest records the parity max relative error and it is <= 1e-4."""
        manifest = load_manifest(cli_export[2])
        parity = manifest.extra["parity"]
        assert 0 <= parity["max_rel_err"] <= 1e-4
        assert parity["forecaster"]["max_rel_err"] <= 1e-4
        assert parity["allocator"]["greedy_action_agreement"] == 1.0
        assert set(parity["forecaster"]["per_optimisation_level"]) == {"disabled", "enabled_all"}

    def test_manifest_carries_checkpoint_metadata(self, cli_export: tuple[int, Path, Path]) -> None:
        """Evaluation, training data, state layout, opset and versions come through."""
        _, run, out = cli_export
        manifest = load_manifest(out)
        assert manifest.evaluation["forecaster"] == {"val_nmae": 0.5}
        assert manifest.evaluation["allocator"] == {"mean_reward": 0.1}
        assert manifest.training_data["forecaster"] == {"traces": 3, "windows": 123}
        assert manifest.state_layout == STATE_LAYOUT
        assert manifest.opset == 17
        assert manifest.interval == {"low_quantile": 0.1, "high_quantile": 0.9}
        assert set(manifest.versions) == {"torch", "onnx", "onnxruntime", "bwpredd"}
        digest = hashlib.sha256((run / "forecaster.pt").read_bytes()).hexdigest()
        assert manifest.extra["export"]["provenance"]["forecaster"]["checkpoint_sha256"] == digest

    def test_onnx_matches_checkpoint(self, cli_export: tuple[int, Path, Path]) -> None:
        """The published forecaster gives what the checkpoint's torch model gives."""
        _, run, out = cli_export
        model, _ = fmod.load_checkpoint(str(run / "forecaster.pt"))
        windows = synthetic_windows(32, seed=5)
        got = load_model(out).run_forecaster(windows)
        for g, r in zip(got, torch_forecast(model, windows), strict=True):
            torch.testing.assert_close(
                torch.from_numpy(g[:, None]).double(), torch.from_numpy(r), rtol=1e-4, atol=1e-6
            )

    def test_existing_destination_refused(self, cli_export: tuple[int, Path, Path]) -> None:
        """Exporting over an existing version fails without --force and leaves it intact."""
        _, run, out = cli_export
        before = (out / "manifest.json").read_bytes()
        rc = export_main(["--run", str(run), "--out", str(out), "--traces", str(run)])
        assert rc == 1
        assert (out / "manifest.json").read_bytes() == before

    def test_missing_allocator_fails_clearly(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Without allocator.pt the export fails and names --untrained-allocator."""
        run = _fresh_run(tmp_path / "run", allocator=False)
        rc = export_main(["--run", str(run), "--out", str(tmp_path / "out")])
        assert rc == 2
        assert "--untrained-allocator" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()

    def test_untrained_allocator_bootstraps(self, tmp_path: Path) -> None:
        """--untrained-allocator exports a seeded Q-network and says so in the manifest."""
        run = _fresh_run(tmp_path / "run", allocator=False)
        out = tmp_path / "out"
        args = ["--run", str(run), "--out", str(out), "--untrained-allocator"]
        assert (
            export_main([*args, "--traces", str(tmp_path / "none"), "--parity-windows", "128"]) == 0
        )
        assert "untrained" in load_manifest(out).evaluation["allocator"]["note"]

    def test_state_layout_mismatch_refused(self, tmp_path: Path) -> None:
        """An allocator trained on another state layout is refused."""
        run = _fresh_run(tmp_path / "run")
        ckpt = torch.load(run / "allocator.pt", weights_only=True)
        ckpt["state_layout"] = list(reversed(STATE_LAYOUT))
        torch.save(ckpt, run / "allocator.pt")
        assert export_main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
        assert not (tmp_path / "out").exists()


class TestVerification:
    def test_parity_catches_a_different_graph(self) -> None:
        """Parity fails when the graph is not the model it is compared with."""
        torch.manual_seed(0)
        a, b = fmod.Forecaster().eval(), fmod.Forecaster().eval()
        with pytest.raises(ParityError, match="relative error"):
            forecaster_parity(a, export_forecaster(b), synthetic_windows(64))

    def test_wrong_output_shape_refused(self, tmp_path: Path) -> None:
        """A Q-network with 9 actions cannot be published: the manifest refuses it."""
        torch.manual_seed(0)
        with pytest.raises(ManifestError, match="q_values"):
            export_model_dir(
                fmod.Forecaster(),
                qnet.QNetwork(qnet.QNetConfig(state_size=len(STATE_LAYOUT), n_actions=9)),
                tmp_path / "out",
                windows=synthetic_windows(32),
                windows_source="synthetic",
                timing=False,
                log=lambda _s: None,
            )
        assert not (tmp_path / "out").exists()
        assert list(tmp_path.iterdir()) == []


class TestManifestSchema:
    def test_missing_field_rejected(self, helper_dir: Path) -> None:
        """A manifest without a required field is rejected, naming the field."""
        raw = json.loads((helper_dir / "manifest.json").read_text())
        assert Manifest.from_json(raw).version == "test-1"
        for field in ("interval", "state_layout", "forecaster", "version"):
            broken = {k: v for k, v in raw.items() if k != field}
            with pytest.raises(ManifestError, match=field):
                Manifest.from_json(broken)

    def test_round_trips_through_json(self, helper_dir: Path) -> None:
        """to_json gives back what from_json read, extra sections included."""
        raw = json.loads((helper_dir / "manifest.json").read_text())
        # to_json leaves tuples where JSON has lists, so compare as JSON.
        assert json.loads(json.dumps(Manifest.from_json(raw).to_json())) == raw


class TestPublish:
    def test_force_replaces_atomically(self, tmp_path: Path) -> None:
        """publish_dir with force swaps in the new directory and removes the old one."""
        dest, new = tmp_path / "m", tmp_path / ".m.new"
        dest.mkdir()
        (dest / "f").write_text("old")
        new.mkdir()
        (new / "f").write_text("new")
        with pytest.raises(ExportError, match="exists"):
            publish_dir(new, dest)
        publish_dir(new, dest, force=True)
        assert (dest / "f").read_text() == "new"
        assert [p.name for p in tmp_path.iterdir()] == ["m"]

    def test_copy_model_dir_refreshes_a_copy(self, helper_dir: Path, tmp_path: Path) -> None:
        """copy_model_dir (used by --embed) replaces a stale copy with a checked one."""
        dest = tmp_path / "default"
        dest.mkdir()
        (dest / "stale.txt").write_text("x")
        copy_model_dir(helper_dir, dest, log=lambda _s: None)
        assert sorted(p.name for p in dest.iterdir()) == sorted(
            p.name for p in helper_dir.iterdir()
        )
        assert load_manifest(dest).version == "test-1"


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
class TestPlantedPaths:
    """Publishing as root under a directory another user owns (as the service's
    dynamic user owns /var/lib/bwpredd) follows no link that user planted and
    writes into no directory that user may write."""

    @staticmethod
    def _service_dir(tmp_path: Path) -> Path:
        d = tmp_path / "var-lib-bwpredd"
        d.mkdir(mode=0o700)
        os.chown(d, NOBODY, NOBODY)
        return d

    def test_planted_parent_link_not_followed(
        self, cli_export: tuple[int, Path, Path], tmp_path: Path
    ) -> None:
        """--force --out <service dir>/models/current, ``models`` a symlink the
        service's user planted: the link's target is neither replaced nor
        written to, and export fails."""
        state = self._service_dir(tmp_path)
        victim = tmp_path / "victim"
        (victim / "current").mkdir(parents=True)
        (victim / "current" / "precious").write_text("x")
        link = state / "models"
        link.symlink_to(victim)
        os.lchown(link, NOBODY, NOBODY)
        argv = ["--run", str(cli_export[1]), "--out", str(link / "current"), "--force"]
        assert export_main([*argv, "--version", "v2", "--parity-windows", "256"]) == 1
        assert [p.name for p in victim.iterdir()] == ["current"]
        assert [p.name for p in (victim / "current").iterdir()] == ["precious"]

    def test_parent_another_user_owns_refused(self, helper_dir: Path, tmp_path: Path) -> None:
        """A parent directory another user owns (they could swap what export
        writes there) is refused, naming its owner; nothing is created in it."""
        state = self._service_dir(tmp_path)
        with pytest.raises(ExportError, match=r"owned by uid 65534"):
            copy_model_dir(helper_dir, state / "current", log=lambda _s: None)
        assert list(state.iterdir()) == []

    def test_own_parent_inside_service_dir_publishes(
        self, helper_dir: Path, tmp_path: Path
    ) -> None:
        """A parent export creates (root's, mode 0755) under the service's
        directory is fine: the model is published there and readable."""
        dest = self._service_dir(tmp_path) / "models" / "current"
        copy_model_dir(helper_dir, dest, log=lambda _s: None)
        copy_model_dir(helper_dir, dest, log=lambda _s: None)  # replacing it too
        assert load_manifest(dest).version == "test-1"
        assert [p.name for p in dest.parent.iterdir()] == ["current"]
        assert dest.parent.stat().st_uid == os.geteuid()


class TestHelper:
    def test_forecast_scale_scales_outputs(self, helper_dir: Path, tmp_path: Path) -> None:
        """make_model_dir(forecast_scale=k) multiplies point and interval by k."""
        scaled = make_model_dir(tmp_path / "scaled", forecast_scale=7.0)
        windows = synthetic_windows(16, seed=3)
        outs = []
        for d in (helper_dir, scaled):
            outs.append(load_model(d).run_forecaster(windows))
        for base, big in zip(*outs, strict=True):
            np.testing.assert_allclose(big, 7.0 * base, rtol=1e-5, atol=1e-6)

    def test_seed_changes_weights_and_replace_in_place(self, tmp_path: Path) -> None:
        """Rebuilding a dir in place with another seed and version gives new files."""
        d = make_model_dir(tmp_path / "m", seed=1, version="a")
        first = load_manifest(d).forecaster.sha256
        make_model_dir(d, seed=2, version="b")
        manifest = load_manifest(d)
        assert manifest.version == "b"
        assert manifest.forecaster.sha256 != first


class TestInt8:
    def test_int8_verdict_is_measured_and_honoured(self, helper_dir: Path) -> None:
        """try_int8 reports a measured verdict per graph and ships what it chose."""
        f_bytes = (helper_dir / "forecaster.onnx").read_bytes()
        a_bytes = (helper_dir / "allocator.onnx").read_bytes()
        windows = synthetic_windows(128, seed=1)
        states = np.random.default_rng(0).normal(size=(128, len(STATE_LAYOUT))).astype(np.float32)
        f_out, a_out, report = try_int8(
            f_bytes, a_bytes, windows, states, rounds=(20, 2), log=lambda _s: None
        )
        for name, original, shipped in (
            ("forecaster", f_bytes, f_out),
            ("allocator", a_bytes, a_out),
        ):
            entry = report[name]
            assert entry["chosen"] in {"int8", "float32"}
            assert set(entry["speedup"]) == {"batch1", "batch1000"}
            assert entry["sizes_bytes"]["int8"] < entry["sizes_bytes"]["float32"]
            assert (shipped == original) == (entry["chosen"] == "float32")
        assert report["forecaster"]["max_normalised_mae_vs_float"] >= 0
        assert 0 <= report["allocator"]["greedy_action_agreement_vs_float"] <= 1
