"""Eager answers (bwpredd.eager): which peers get them, how they are batched,
and that they are the answers the plain path gives, through a real server.

The cache's correctness under every way a window changes between a sample
and its eager computation is in ``test_answer_cache.py``
(``TestEagerPending`` and the differential test).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from bwpredd.cli import _parser
from bwpredd.client import Client, pb
from bwpredd.config import Config
from bwpredd.eager import EAGER_INTEREST_UPDATES, EAGER_MAX_BATCH, Eager
from bwpredd.server import Server
from tests.bwpredd.test_answer_cache import (
    Reference,
    assert_current,
    eager_count,
    eager_idle,
    fill,
    ingest,
    on_loop,
)
from tests.helpers import running_server, sample

MODEL = pb.FORECAST_SOURCE_MODEL


def fresh(server: Server, peer: str) -> tuple[bool, bool]:
    """Whether the cached forecast and allocation of ``peer`` are current."""
    core = server.core
    assert core is not None
    slot = core.store.slot(peer)
    assert slot is not None
    one = np.array([slot])
    return on_loop(
        server,
        lambda: (not core.answers.stale(one)[0], not core.answers.alloc_stale(one)[0]),
    )


def push_one(client: Client, peer: str, bw: float) -> None:
    assert client.push([sample(peer, bw, latency_ms=5.0)]).accepted == 1


class TestInterest:
    """Which samples start an eager computation."""

    def test_forecast_then_allocate(self, tmp_path: Path) -> None:
        """After a Forecast naming the peer alone, its next sample has the
        forecast computed (not the allocation); after an Allocate, both."""
        with running_server(tmp_path) as (server, client):
            fill(client, "a", 100.0)
            push_one(client, "a", 110.0)
            assert fresh(server, "a") == (False, False)  # never asked: nothing early
            client.forecast(["a"])
            push_one(client, "a", 120.0)
            eager_idle(server)
            assert fresh(server, "a") == (True, False)
            client.allocate(["a"])
            push_one(client, "a", 130.0)
            eager_idle(server)
            assert fresh(server, "a") == (True, True)
            assert eager_count(server, "computed") == 2

    def test_interest_lapses(self, tmp_path: Path) -> None:
        """An ask makes the next EAGER_INTEREST_UPDATES updates eager and
        no more; an ask renews it."""
        with running_server(tmp_path) as (server, client):
            fill(client, "a", 100.0)
            client.allocate(["a"])
            for i in range(EAGER_INTEREST_UPDATES + 2):
                push_one(client, "a", 100.0 + i)
                eager_idle(server)
            assert eager_count(server, "computed") == EAGER_INTEREST_UPDATES
            client.allocate(["a"])
            push_one(client, "a", 90.0)
            eager_idle(server)
            assert eager_count(server, "computed") == EAGER_INTEREST_UPDATES + 1

    def test_update_is_a_request(self, tmp_path: Path) -> None:
        """Several samples of the peer in one request are one update: a peer
        whose samples arrive in batches keeps its interest."""
        with running_server(tmp_path) as (server, client):
            fill(client, "a", 100.0)
            for i in range(4):
                client.forecast(["a"])
                batch = [sample("a", 100.0 + i + 0.1 * k, latency_ms=5.0) for k in range(5)]
                assert client.push(batch).accepted == 5
                eager_idle(server)
            assert eager_count(server, "computed") == 4

    def test_advise_marks_interest(self, tmp_path: Path) -> None:
        """Advise for one peer marks it, as Forecast does."""
        with running_server(tmp_path) as (server, client):
            fill(client, "a", 100.0)
            client.stub.Advise(pb.AdviseRequest(peer_id="a", payload_bytes=10**6), timeout=10)
            push_one(client, "a", 120.0)
            eager_idle(server)
            assert fresh(server, "a") == (True, False)

    def test_batched_requests_mark_none(self, tmp_path: Path) -> None:
        """Forecast and Allocate naming several peers start no eager work
        on their next samples (one batched Allocate per tick costs nothing
        more)."""
        with running_server(tmp_path) as (server, client):
            peers = [f"p{i}" for i in range(5)]
            for p in peers:
                fill(client, p, 100.0)
            for _ in range(3):
                client.allocate(peers)
                client.forecast(peers[:2])
                assert client.push([sample(p, 140.0) for p in peers]).accepted == len(peers)
            assert server.core is not None and server.core.eager is not None
            eager = server.core.eager
            assert on_loop(server, lambda: eager.pending) == 0
            assert eager_count(server, "computed") == eager_count(server, "skipped") == 0
            assert fresh(server, "p0") == (False, False)

    def test_off(self, tmp_path: Path) -> None:
        """eager_answers = false: nothing computed early, the
        same answers."""
        with running_server(tmp_path, eager_answers=False) as (server, client):
            assert server.core is not None and server.core.eager is None
            fill(client, "a", 100.0)
            client.allocate(["a"])
            push_one(client, "a", 120.0)
            assert fresh(server, "a") == (False, False)
            assert_current(client, Reference(), "a")
            assert eager_count(server, "computed") == 0


class Batches:
    """Records the peers of each eager computation (the real one runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        real = Eager.compute

        def compute(eager: Eager, slots: np.ndarray, alloc: np.ndarray) -> int:
            self.sizes.append(len(slots))
            return real(eager, slots, alloc)

        monkeypatch.setattr(Eager, "compute", compute)


class TestBatching:
    """The peers noted before the callback runs are computed together."""

    def test_coalesced(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Samples for 6 peers in two ingest calls before the callback runs
        are computed in one batch of 6, whose answers equal the plain ones."""
        batches = Batches(monkeypatch)
        with running_server(tmp_path) as (server, client):
            ref = Reference()
            peers = [f"p{i}" for i in range(6)]
            for i, p in enumerate(peers):
                fill(client, p, 10.0 * 3**i)
                client.allocate([p])
            rest = [sample(p, 20.0 * 3**i, latency_ms=5.0) for i, p in enumerate(peers[1:])]
            on_loop(
                server,
                lambda: (ingest(server, sample("p0", 5.0, latency_ms=5.0)), ingest(server, *rest)),
            )
            eager_idle(server)
            assert batches.sizes == [6]
            assert eager_count(server, "computed") == 6
            for p in peers:
                assert fresh(server, p) == (True, True)
                assert_current(client, ref, p)

    def test_batch_cap(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """More peers than EAGER_MAX_BATCH are computed in several
        callbacks, each at most EAGER_MAX_BATCH."""
        batches = Batches(monkeypatch)
        n = EAGER_MAX_BATCH + 6
        with running_server(tmp_path) as (server, client):
            peers = [f"p{i:03d}" for i in range(n)]
            assert client.push([sample(p, 50.0) for p in peers for _ in range(10)]).accepted
            for p in peers:
                client.forecast([p])
            assert client.push([sample(p, 60.0) for p in peers]).accepted == n
            eager_idle(server)
            assert batches.sizes == [EAGER_MAX_BATCH, n - EAGER_MAX_BATCH]
            assert eager_count(server, "computed") == n
            assert_current(client, Reference(), peers[-1])


class TestSameAnswers:
    """Eager answers are the plain path's answers."""

    def test_on_and_off_agree(self, tmp_path: Path) -> None:
        """Two daemons, eager answers on and off, fed the same samples with
        the same timestamps; after each sample the peer is asked alone
        (Forecast, Allocate, Advise in turn): every reply is identical, the
        guardrail's fallbacks included."""
        rng = np.random.default_rng(3)
        peers = [f"peer-{i}" for i in range(4)]
        t0 = int(time.time()) - 1000
        sources: set[int] = set()
        with (
            running_server(tmp_path / "on", eager_answers=True) as (on, c_on),
            running_server(tmp_path / "off", eager_answers=False) as (_, c_off),
        ):
            for step in range(40):
                for j, p in enumerate(peers):
                    s = sample(
                        p,
                        float(10 ** (1 + j) * rng.lognormal(0.0, 0.3)),
                        latency_ms=float(rng.uniform(1, 80)),
                        packet_loss=float(rng.uniform(0, 0.02)),
                    )
                    s.timestamp.seconds = t0 + step
                    assert c_on.push([s]).accepted == c_off.push([s]).accepted == 1
                    if step < 9:
                        continue
                    kind = (step + j) % 3
                    if kind == 0:
                        assert c_on.forecast([p]) == c_off.forecast([p])
                    elif kind == 1:
                        assert c_on.allocate([p]) == c_off.allocate([p])
                    else:
                        req = pb.AdviseRequest(peer_id=p, payload_bytes=10**8)
                        a = c_on.stub.Advise(req, timeout=10).advice
                        b = c_off.stub.Advise(req, timeout=10).advice
                        assert a == b
                        sources.add(a.forecast.source)
            assert eager_count(on, "computed") > 50
            assert MODEL in sources

    def test_failure(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An eager computation that fails logs a warning (rate-limited) and
        the question is answered inline, correctly."""

        def broken(*args: object, **kwargs: object) -> int:
            raise RuntimeError("broken on purpose")

        monkeypatch.setattr(Eager, "compute", broken)
        with capture_logs() as logs, running_server(tmp_path) as (server, client):
            fill(client, "a", 100.0)
            client.allocate(["a"])
            for bw in (120.0, 130.0):
                push_one(client, "a", bw)
                eager_idle(server)
                assert_current(client, Reference(), "a")
        failed = [e for e in logs if e["event"] == "eager_answers_failed"]
        assert len(failed) == 1 and "broken on purpose" in failed[0]["error"]
        assert eager_count(server, "computed") == 0


class TestConfig:
    """The option, as every option: flag > environment > file > default."""

    def test_sources(self, tmp_path: Path) -> None:
        """On by default; off by BWPREDD_EAGER_ANSWERS, the TOML key or the
        flag."""
        assert Config.load(env={}).eager_answers is True
        assert Config.load(env={"BWPREDD_EAGER_ANSWERS": "false"}).eager_answers is False
        toml = tmp_path / "c.toml"
        toml.write_text("eager_answers = false\n")
        assert Config.load(env={}, file=toml).eager_answers is False
        flags = vars(_parser().parse_args(["--no-eager-answers"]))
        flags.pop("config")
        assert Config.load(flags=flags, env={}).eager_answers is False
        flags = vars(_parser().parse_args(["--eager-answers"]))
        flags.pop("config")
        env = {"BWPREDD_EAGER_ANSWERS": "false"}
        assert Config.load(flags=flags, env=env).eager_answers is True
