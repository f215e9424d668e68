"""Data-parallel training: the lone-process helpers, the sharded layers, and
real two-rank ``torchrun`` runs of ``trainer train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers import write_csv_traces
from trainer import distributed
from trainer.data_parallel import (
    ShardDropout,
    ShardedBatch,
    SyncBatchNorm1d,
    assign_shards,
    shard_modules,
    unshard_modules,
)
from trainer.models.forecaster import Forecaster, ForecasterConfig, load_checkpoint
from trainer.train_forecaster import TraceBank, TrainConfig, train_forecaster

REPO = Path(__file__).resolve().parents[2]


@dataclass
class _Trace:
    source: str
    data: np.ndarray


def _traces(n: int, length: int, seed: int) -> list[_Trace]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        data = np.zeros((length + 10 * k, 4), dtype=np.float32)
        data[:, 0], data[:, 3] = 50.0, 1.0
        data[:, 1] = 10.0 * np.exp(rng.normal(0, 0.3, len(data)))
        out.append(_Trace("ab"[k % 2], data))
    return out


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    """A real gloo process group of one rank in this process."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


class TestLoneProcess:
    def test_without_torchrun_nothing_is_initialised(self) -> None:
        """Without torchrun's variables setup() does nothing: rank 0 of 1, no backend."""
        assert not distributed.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "1"})
        if not distributed.launched_by_torchrun():
            distributed.setup()
        assert not distributed.is_active()
        assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
        assert distributed.describe() == {"world_size": 1, "backend": None}
        t = torch.tensor([1.5])
        assert distributed.all_reduce_sum(t) is t and t.item() == 1.5
        assert distributed.all_gather_str("x") == ["x"]
        distributed.barrier()
        distributed.shutdown()

    def test_torchrun_variables_are_recognised(self) -> None:
        """The four variables torchrun sets mark a distributed launch."""
        env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
        assert distributed.launched_by_torchrun(env)

    def test_digest_sees_one_changed_weight(self) -> None:
        """The state digest is stable and changes when one weight changes."""
        torch.manual_seed(0)
        model = Forecaster(ForecasterConfig(residual=True))
        before = distributed.state_digest(model)
        assert distributed.state_digest(model) == before
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-6
        assert distributed.state_digest(model) != before


class TestShards:
    def test_assignment_balances_work(self) -> None:
        """Largest first to the least loaded rank: loads within the largest item."""
        work = np.random.default_rng(0).exponential(1.0, 200)
        for world in (1, 2, 3, 8):
            owner = assign_shards(work, world)
            load = np.bincount(owner, weights=work, minlength=world)
            assert set(owner.tolist()) == set(range(world))
            assert load.max() - load.min() <= work.max()
        assert (assign_shards(work, 3) == assign_shards(work, 3)).all()

    def test_shards_hold_every_window_once(self) -> None:
        """The ranks' shards of a bank together give the whole bank's windows and weights."""
        traces = _traces(7, 40, 0)
        whole = TraceBank(traces, {})
        x, y, _, w = whole.fixed(16)
        owner = assign_shards(whole.trace_p, 3)
        parts = []
        for r in range(3):
            bank = TraceBank(traces, {})
            bank.shard(owner, r)
            parts.append(bank.fixed(16))
        assert sum(len(p[0]) for p in parts) == len(x)
        assert sum(float(p[3].sum()) for p in parts) == pytest.approx(float(w.sum()))
        got = sorted(float(v) for p in parts for v in p[1])
        assert got == sorted(float(v) for v in y)

    def test_every_rank_draws_the_same_batch(self) -> None:
        """draw() depends on the metadata only: a shard draws the whole bank's rows."""
        traces = _traces(5, 30, 1)
        whole, part = TraceBank(traces, {}), TraceBank(traces, {})
        part.shard(assign_shards(part.trace_p, 2), 1)
        a = whole.draw(np.random.default_rng(3), 64)
        b = part.draw(np.random.default_rng(3), 64)
        assert all((u == v).all() for u, v in zip(a, b, strict=True))
        mine = np.flatnonzero(part.owner[b[0]] == 1)
        xp, _, _ = part.gather(b[0][mine], b[1][mine])
        xw, _, _ = whole.gather(a[0], a[1])
        assert torch.equal(xp, xw[mine])


class TestShardedLayers:
    def test_dropout_mask_is_the_lone_process_mask_sliced(self) -> None:
        """A rank's dropout rows are the lone process's rows, on an LSTM's (time-major) output."""
        torch.manual_seed(0)
        lstm = nn.LSTM(4, 8, batch_first=True)
        inputs = torch.rand(6, 10, 4)
        with torch.no_grad():
            full, _ = lstm(inputs)
        torch.manual_seed(5)
        expected = nn.functional.dropout(full, 0.2, training=True)
        for rows in ([0, 1, 2, 3, 4, 5], [1, 4], [3], []):
            layer = ShardDropout(0.2)
            layer.shard = ShardedBatch()
            layer.shard.set(6, np.array(rows, dtype=np.int64))
            with torch.no_grad():
                local, _ = lstm(inputs[rows])
            torch.manual_seed(5)
            torch.testing.assert_close(layer(local), expected[rows])

    def test_sync_batch_norm_matches_batch_norm(self, one_rank_group: None) -> None:
        """On one rank the synced batch norm gives torch's outputs, gradients and running stats."""
        torch.manual_seed(0)
        x = torch.randn(16, 8, 10, requires_grad=True)
        plain = nn.BatchNorm1d(8)
        synced = nn.BatchNorm1d(8)
        synced.__class__ = SyncBatchNorm1d
        synced.shard = ShardedBatch()  # type: ignore[assignment]
        synced.shard.set(16, np.arange(16))
        x2 = x.detach().clone().requires_grad_(True)
        y1, y2 = plain(x), synced(x2)
        torch.testing.assert_close(y2, y1)
        (y1 * torch.arange(10.0)).sum().backward()
        (y2 * torch.arange(10.0)).sum().backward()
        torch.testing.assert_close(x2.grad, x.grad)
        torch.testing.assert_close(synced.running_var, plain.running_var)
        torch.testing.assert_close(synced.running_mean, plain.running_mean)
        synced.eval(), plain.eval()
        torch.testing.assert_close(synced(x2), plain(x))

    def test_swap_is_undone(self) -> None:
        """A lone process never swaps layers; unshard restores torch's classes and keys."""
        model = Forecaster()
        keys = list(model.state_dict())
        shard_modules(model, ShardedBatch())  # world size 1: a no-op
        assert not any(isinstance(m, ShardDropout | SyncBatchNorm1d) for m in model.modules())
        for m in model.modules():
            if type(m) is nn.Dropout:
                m.__class__, m.shard = ShardDropout, ShardedBatch()  # type: ignore[assignment]
        unshard_modules(model)
        assert not any(isinstance(m, ShardDropout) for m in model.modules())
        assert list(model.state_dict()) == keys


class TestBudget:
    def test_no_time_budget_by_default(self) -> None:
        """Training stops on epochs or early stopping; the time cap is off unless set."""
        assert TrainConfig().time_budget_s == 0
        traces = _traces(4, 60, 2)
        cfg = TrainConfig(max_epochs=2, steps_per_epoch=3, val_windows_per_trace=4)
        _, hist = train_forecaster(traces, traces, cfg, progress=False)
        assert hist.stopped == "max_epochs=2 reached"
        cfg.time_budget_s = 1e-9
        _, hist = train_forecaster(traces, traces, cfg, progress=False)
        assert hist.stopped.startswith("time budget") and len(hist.epoch) == 1


def _train_args(traces: Path, out: Path) -> list[str]:
    return ["train", "--traces", str(traces), "--seed", "0", "--out", str(out), "--quick",
            "--skip-agent", "--skip-transfer", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same --quick command, in one process and on two torchrun ranks."""
    from trainer.__main__ import main

    tmp = tmp_path_factory.mktemp("ddp")
    traces = write_csv_traces(tmp / "traces", length=120)
    assert main(_train_args(traces, tmp / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in distributed.TORCHRUN_VARIABLES:
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "trainer", *_train_args(traces, tmp / "two")]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"one": tmp / "one", "two": tmp / "two"}


def _report(run: Path) -> dict[str, object]:
    out: dict[str, object] = json.loads((run / "reports" / "training_report.json").read_text())
    return out


@pytest.mark.slow
class TestTorchrun:
    def test_two_ranks_end_with_identical_weights(self, runs: dict[str, Path]) -> None:
        """Under torchrun both ranks end bit-identical; the report says world 2 on gloo."""
        block = _report(runs["two"])["distributed"]
        assert isinstance(block, dict)
        assert block["world_size"] == 2 and block["backend"] == "gloo"
        digests = block["rank_weights_sha256"]
        assert len(digests) == 2 and digests[0] == digests[1]
        model, _ = load_checkpoint(str(runs["two"] / "forecaster.pt"))
        assert distributed.state_digest(model) == digests[0]

    def test_lone_process_report(self, runs: dict[str, Path]) -> None:
        """A run without torchrun records world size 1 and no backend."""
        block = _report(runs["one"])["distributed"]
        assert isinstance(block, dict)
        assert (block["world_size"], block["backend"]) == (1, None)
        model, _ = load_checkpoint(str(runs["one"] / "forecaster.pt"))
        assert block["rank_weights_sha256"] == [distributed.state_digest(model)]

    def test_one_and_two_ranks_train_the_same_model(self, runs: dict[str, Path]) -> None:
        """One process and two ranks give the same weights and validation curve,
        within floating-point reduction order."""
        one, _ = load_checkpoint(str(runs["one"] / "forecaster.pt"))
        two, _ = load_checkpoint(str(runs["two"] / "forecaster.pt"))
        for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
            else:
                assert torch.equal(a, b), name
        hist = [_report(runs[k])["training"] for k in ("one", "two")]
        assert isinstance(hist[0], dict) and isinstance(hist[1], dict)
        assert hist[0]["epochs_run"] == hist[1]["epochs_run"]
        np.testing.assert_allclose(
            hist[1]["history"]["val_loss"], hist[0]["history"]["val_loss"], rtol=1e-5
        )
