"""End to end: recordings -> trainer retrain -> export --gate -> reload.

The recordings are two nodes' contended datacenter links (a periodic job
takes 60% of each link for 2 s in 5: :func:`tests.recording_files.contended_link`),
written with plain numpy.savez; the base is the embedded default model,
trained on public cellular and broadband traces, which never saw such a link.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bwpredd.manifest import load_manifest
from bwpredd.modeldir import DEFAULT_MODEL_DIR
from export.__main__ import EXIT_OK, EXIT_REFUSED
from export.__main__ import main as export_main
from tests.bwpredd.test_reload import fill, reload
from tests.conftest_models import make_model_dir
from tests.helpers import running_server
from tests.recording_files import write_mesh
from trainer import distributed
from trainer.__main__ import main as trainer_main
from trainer.models.from_onnx import MAX_REL_ERR
from trainer.report_retrain import GATE_MARGIN

pytestmark = pytest.mark.slow
NODES = ("node-a", "node-b")


def _retrain(recordings: Path, out: Path, *extra: str) -> Path:
    args = ["retrain", "--recordings", str(recordings), "--base", str(DEFAULT_MODEL_DIR)]
    args += ["--out", str(out), "--quick", "--quiet", *extra]
    assert trainer_main(args) == 0
    return out


def _digest(model_dir: Path) -> dict[str, str]:
    """Every file of a directory (and of its parent's listing) by sha256."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in model_dir.iterdir()}
    out["<siblings>"] = ",".join(sorted(p.name for p in model_dir.parent.iterdir()))
    return out


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mesh") / "fleet"
    write_mesh(root, NODES, peers=3, steps=400)
    return root


@pytest.fixture(scope="module")
def retrained(mesh: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuning of 6 epochs of 50 batches (and a few allocator episodes)."""
    out = tmp_path_factory.mktemp("run") / "run"
    return _retrain(mesh, out, "--epochs", "6", "--steps-per-epoch", "50")


@pytest.fixture(scope="module")
def unchanged(mesh: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A retrain with a budget of 0 epochs: the base's own weights."""
    out = tmp_path_factory.mktemp("run0") / "run"
    return _retrain(mesh, out, "--epochs", "0", "--agent-episodes", "5")


@pytest.fixture
def serving(tmp_path: Path) -> Path:
    """A copy of the base: the directory a daemon serves."""
    dest = tmp_path / "models" / "current"
    shutil.copytree(DEFAULT_MODEL_DIR, dest)
    return dest


class TestRetrain:
    """python -m trainer retrain on two nodes' recordings."""

    def test_run_directory_and_report(self, retrained: Path) -> None:
        """The run holds what export takes, the base's copy, and a report with
        the base, the retrained forecaster and the baselines per node and macro."""
        for name in ("forecaster.pt", "allocator.pt", "split.json", "retrain.json", "retrain.md"):
            assert (retrained / name).is_file(), name
        assert load_manifest(retrained / "base").version == load_manifest(DEFAULT_MODEL_DIR).version
        report = json.loads((retrained / "retrain.json").read_text())
        assert set(report["test"]["per_node"]) == set(NODES)
        for row in [report["test"]["macro"], *report["test"]["per_node"].values()]:
            for method in ("base", "retrained", "last_value", "ewma", "harmonic_mean", "mean"):
                assert row[method] > 0, method
        assert report["base"]["parity"]["max_rel_err"] <= MAX_REL_ERR
        assert report["training"]["max_epochs"] == 6
        assert report["training"]["lr"] < 1e-3  # below training from scratch
        md = (retrained / "retrain.md").read_text()
        assert all(node in md for node in NODES) and "macro" in md

    def test_learns_the_mesh(self, retrained: Path) -> None:
        """On the links the base never saw, the retrained forecaster beats the
        base by more than the gate's margin and beats every baseline, on
        each node's most recent samples."""
        report = json.loads((retrained / "retrain.json").read_text())
        for row in [report["test"]["macro"], *report["test"]["per_node"].values()]:
            assert row["retrained"] <= GATE_MARGIN * row["base"]
            assert row["retrained"] <= row["best_baseline"]["nmae"]
        assert report["gate"]["passes"]

    def test_figures_are_trainer_eval_on_the_test_split(
        self, retrained: Path, mesh: Path, tmp_path: Path
    ) -> None:
        """trainer eval --split-from the run, on the recordings, gives the
        report's figures for the checkpoint and for the base directory."""
        report = json.loads((retrained / "retrain.json").read_text())
        for model, key in ((retrained / "forecaster.pt", "retrained"), (DEFAULT_MODEL_DIR, "base")):
            out = tmp_path / f"{key}.json"
            args = ["eval", "--traces", str(mesh), "--model", str(model), "--quiet"]
            args += ["--split-from", str(retrained), "--split", "test", "--json", str(out)]
            assert trainer_main(args) == 0
            got = json.loads(out.read_text())
            assert got["macro"]["model"]["nmae"] == pytest.approx(
                report["test"]["macro"][key], rel=1e-5
            )
            assert got["macro"]["model"]["n_windows"] == report["test"]["macro"]["windows"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
class TestPlantedPaths:
    """retrain as root writes its run through no path another user could
    have placed."""

    def test_run_dir_another_user_owns_refused(
        self, mesh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out in a directory another user owns (as the service's user owns
        /var/lib/bwpredd), with split.json a link they planted: refused with
        exit 2 naming --out, the link's target untouched."""
        state = tmp_path / "var-lib-bwpredd"
        state.mkdir(mode=0o700)
        os.chown(state, 65534, 65534)
        out = state / "run"
        out.mkdir()
        os.chown(out, 65534, 65534)
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (out / "split.json").symlink_to(victim)
        os.lchown(out / "split.json", 65534, 65534)
        args = ["retrain", "--recordings", str(mesh), "--base", str(DEFAULT_MODEL_DIR)]
        assert trainer_main([*args, "--out", str(out), "--quick", "--quiet"]) == 2
        assert "--out" in capsys.readouterr().err
        assert victim.read_text() == "precious"
        # Nor would root create a run directory there: the user could swap it.
        new = state / "new"
        assert trainer_main([*args, "--out", str(new), "--quick", "--quiet"]) == 2
        assert "owned by uid 65534" in capsys.readouterr().err
        assert not new.exists()


class TestTorchrun:
    def test_two_ranks_fine_tune_one_model(self, mesh: Path, tmp_path: Path) -> None:
        """``torchrun --nproc-per-node 2 -m trainer retrain``: both ranks end
        with the same weights, rank 0 writes the run, the report says world 2
        on gloo and the checkpoint is the model the ranks agreed on."""
        from trainer.models.forecaster import load_checkpoint

        out = tmp_path / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for name in distributed.TORCHRUN_VARIABLES:
            env.pop(name, None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "-m", "trainer", "retrain", "--recordings", str(mesh),
               "--base", str(DEFAULT_MODEL_DIR), "--out", str(out), "--epochs", "2",
               "--steps-per-epoch", "20", "--agent-episodes", "5", "--quick",
               "--quiet"]  # fmt: skip
        repo = Path(__file__).resolve().parents[1]
        proc = subprocess.run(
            cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "retrain.json").read_text())
        block = report["distributed"]
        assert (block["world_size"], block["backend"]) == (2, "gloo")
        digests = block["rank_weights_sha256"]
        assert len(digests) == 2 and digests[0] == digests[1]
        model, _ = load_checkpoint(str(out / "forecaster.pt"))
        assert distributed.state_digest(model) == digests[0]
        assert report["training"]["max_epochs"] == 2
        assert (out / "retrain.md").is_file() and (out / "allocator.pt").is_file()


class TestGate:
    """python -m export --run DIR --gate."""

    def test_refuses_a_model_that_is_not_better(
        self, unchanged: Path, serving: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The base's own weights (0 epochs) do not clear the margin: exit
        non-zero naming the figures, the serving directory untouched."""
        before = _digest(serving)
        rc = export_main(["--run", str(unchanged), "--gate", "--out", str(serving)])
        err = capsys.readouterr().err
        assert rc == EXIT_REFUSED
        assert "gate REFUSED" in err and "1.000x the base's" in err
        assert f"must be <= {GATE_MARGIN:g}x: NO" in err and str(serving) in err
        assert _digest(serving) == before

    def test_refuses_a_checkpoint_the_report_did_not_measure(
        self, retrained: Path, unchanged: Path, serving: Path, tmp_path: Path
    ) -> None:
        """A forecaster.pt swapped after the run is refused, not trusted."""
        run = tmp_path / "run"
        shutil.copytree(retrained, run)
        shutil.copy(unchanged / "forecaster.pt", run / "forecaster.pt")
        before = _digest(serving)
        assert export_main(["--run", str(run), "--gate", "--out", str(serving)]) == EXIT_REFUSED
        assert _digest(serving) == before

    def test_refuses_to_replace_another_model(
        self, retrained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--out serving a model the run was not compared against, or a
        directory that is no model at all, is left alone."""
        other = make_model_dir(tmp_path / "other", seed=5, version="other-1")
        before = _digest(other)
        assert export_main(["--run", str(retrained), "--gate", "--out", str(other)]) == (
            EXIT_REFUSED
        )
        assert "retrain with --base" in capsys.readouterr().err
        assert _digest(other) == before
        state = tmp_path / "state"
        state.mkdir()
        (state / "peers.npz").write_bytes(b"not a model")
        before = _digest(state)
        assert export_main(["--run", str(retrained), "--gate", "--out", str(state)]) == (
            EXIT_REFUSED
        )
        assert "not a model directory" in capsys.readouterr().err
        assert _digest(state) == before

    def test_publishes_a_better_model_and_a_reload_serves_it(
        self, retrained: Path, serving: Path, tmp_path: Path
    ) -> None:
        """A run that clears the gate replaces the serving directory (the
        base's horizons kept); the running daemon serves it after a reload."""
        old = load_manifest(serving).version
        with running_server(tmp_path, model_dir=str(serving)) as (server, client):
            ids = fill(client, 2)
            assert {f.model_version for f in client.forecast(ids)} == {old}
            rc = export_main(["--run", str(retrained), "--gate", "--out", str(serving)])
            assert rc == EXIT_OK
            new = load_manifest(serving)
            assert new.version != old
            assert new.horizons == load_manifest(DEFAULT_MODEL_DIR).horizons
            assert client.forecast(ids)[0].model_version == old  # until the reload
            assert reload(server)
            assert {f.model_version for f in client.forecast(ids)} == {new.version}
