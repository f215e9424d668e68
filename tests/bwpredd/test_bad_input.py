"""The bad-input catalogue, through a real server on a unix socket.

Every bad sample is sent twice, on PushSamples and on StreamSamples, next to
a sample for an already stored peer and a good sample: the bad one is rejected
with its field and rule named, the good one is kept, the stored peer is
byte-for-byte unchanged (GetPeer before == after) and a peer made only of
rejected samples is never created. Unit-level rules live in test_validate.py
and test_windows.py; this file checks the same rules end to end.

The timestamp rule, as implemented by validate.py and windows.py: a sample
without a timestamp is stamped with its arrival time; a timestamp must lie in
``[now - max_sample_age_s, now + max_future_skew_s]``; and it must not be older
than the newest sample already accepted for its peer (in the store or earlier
in the same batch; equal is allowed).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bwpredd.client import Client, pb
from bwpredd.server import Server
from tests.helpers import running_server

MAX_BATCH = 50
MAX_BATCH_PEERS = 20
MAX_MESSAGE = 64 * 1024
SKEW_S = 300.0
AGE_S = 86_400.0
INF = math.inf
NAN = math.nan

_ids = itertools.count()


def uid(prefix: str) -> str:
    """A peer id unique within this module's server."""
    return f"{prefix}-{next(_ids)}"


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    whole = math.floor(seconds)
    out.seconds, out.nanos = int(whole), int((seconds - whole) * 1e9)
    return out


def good(peer: str, bw: float = 10.0, at: float | None = None, **extra: Any) -> pb.Sample:
    """A valid sample (all features given)."""
    fields: dict[str, Any] = {
        "latency_ms": 5.0,
        "packet_loss": 0.01,
        "reliability": 0.99,
        **extra,
    }
    if at is not None:
        fields["timestamp"] = ts(at)
    return pb.Sample(peer_id=peer, bandwidth_mbps=bw, **fields)


def state(client: Client, peer: str) -> bytes:
    """Everything the daemon holds for a peer, as bytes (window, counts, last seen)."""
    return client.peer(peer).SerializeToString(deterministic=True)


def assert_absent(client: Client, peer: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.peer(peer)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def stored(client: Client) -> str:
    """A peer with three stored samples, timestamped a little in the past."""
    peer = uid("stored")
    now = time.time()
    resp = client.push([good(peer, 10.0 + i, at=now - 30 + i) for i in range(3)])
    assert resp.accepted == 3
    return peer


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Client]]:
    tmp = tmp_path_factory.mktemp("bad")
    with running_server(
        tmp,
        max_batch_samples=MAX_BATCH,
        max_batch_peers=MAX_BATCH_PEERS,
        max_message_bytes=MAX_MESSAGE,
        max_future_skew_s=SKEW_S,
        max_sample_age_s=AGE_S,
    ) as pair:
        yield pair


@pytest.fixture
def client(daemon: tuple[Server, Client]) -> Client:
    return daemon[1]


# (name, sample fields other than peer_id, field at fault, words of the rule)
# ``None`` for bandwidth means "not given". Timestamps are offsets from now.
VALUE_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("bw-nan", {"bandwidth_mbps": NAN}, "bandwidth_mbps", "finite"),
    ("bw-inf", {"bandwidth_mbps": INF}, "bandwidth_mbps", "finite"),
    ("bw-neg-inf", {"bandwidth_mbps": -INF}, "bandwidth_mbps", "finite"),
    ("bw-negative", {"bandwidth_mbps": -1.0}, "bandwidth_mbps", ">= 0"),
    ("bw-tiny-negative", {"bandwidth_mbps": -5e-324}, "bandwidth_mbps", ">= 0"),
    ("bw-over-10tbps", {"bandwidth_mbps": 1e7 * (1 + 1e-9)}, "bandwidth_mbps", "<= 1e7"),
    ("bw-huge", {"bandwidth_mbps": 1.7e308}, "bandwidth_mbps", "<= 1e7"),
    ("bw-missing", {"bandwidth_mbps": None}, "bandwidth_mbps", "required"),
    ("lat-nan", {"latency_ms": NAN}, "latency_ms", "finite"),
    ("lat-inf", {"latency_ms": INF}, "latency_ms", "finite"),
    ("lat-neg-inf", {"latency_ms": -INF}, "latency_ms", "finite"),
    ("lat-negative", {"latency_ms": -0.001}, "latency_ms", ">= 0"),
    ("lat-over-10min", {"latency_ms": 600_000.001}, "latency_ms", "<= 600000"),
    ("loss-nan", {"packet_loss": NAN}, "packet_loss", "finite"),
    ("loss-inf", {"packet_loss": INF}, "packet_loss", "finite"),
    ("loss-neg-inf", {"packet_loss": -INF}, "packet_loss", "finite"),
    ("loss-negative", {"packet_loss": -0.01}, "packet_loss", "[0, 1]"),
    ("loss-over-one", {"packet_loss": 1.0000001}, "packet_loss", "[0, 1]"),
    ("rel-nan", {"reliability": NAN}, "reliability", "finite"),
    ("rel-inf", {"reliability": INF}, "reliability", "finite"),
    ("rel-neg-inf", {"reliability": -INF}, "reliability", "finite"),
    ("rel-negative", {"reliability": -1e-12}, "reliability", "[0, 1]"),
    ("rel-over-one", {"reliability": 2.0}, "reliability", "[0, 1]"),
    ("ts-future", {"timestamp": SKEW_S + 60}, "timestamp", "future"),
    ("ts-far-future", {"timestamp": 1e12}, "timestamp", "future"),
    ("ts-past", {"timestamp": -(AGE_S + 60)}, "timestamp", "past"),
    ("ts-epoch", {"timestamp": "epoch"}, "timestamp", "past"),
    ("ts-before-epoch", {"timestamp": "min"}, "timestamp", "past"),
    ("ts-int64-max", {"timestamp": "max"}, "timestamp", "future"),
    ("ts-nanos-negative", {"timestamp": ("nanos", -5)}, "timestamp", "nanos must be within"),
    ("ts-nanos-2e9", {"timestamp": ("nanos", 2_000_000_000)}, "timestamp", "[0, 999999999]"),
    ("ts-nanos-1e9", {"timestamp": ("nanos", 1_000_000_000)}, "timestamp", "got 1000000000"),
]

BAD_IDS: list[tuple[str, str]] = [
    ("empty", ""),
    ("129-chars", "a" * 129),
    ("very-long", "a" * 10_000),
    ("non-ascii", "pé"),
    ("cjk", "ピア"),
    ("fullwidth-digit", "peer１"),
    ("emoji", "peer-🙂"),
    ("space-inside", "a b"),
    ("leading-space", " a"),
    ("trailing-newline", "a\n"),
    ("tab", "a\tb"),
    ("nul", "a\x00b"),
    ("del", "a\x7f"),
    ("escape", "\x1b[31m"),
    ("zero-width-space", "a\u200bb"),
    ("rtl-override", "a\u202eb"),
    ("comma", "a,b"),
    ("backslash", "a\\b"),
    ("only-space", " "),
]


def bad_sample(peer: str, fields: dict[str, Any]) -> pb.Sample:
    """A sample carrying ``fields`` (see VALUE_CASES) for ``peer``."""
    msg = good(peer)
    for name, value in fields.items():
        if name == "bandwidth_mbps" and value is None:
            msg.ClearField("bandwidth_mbps")
        elif name == "timestamp":
            if value == "epoch":
                msg.timestamp.CopyFrom(Timestamp(seconds=0))
            elif value == "min":
                msg.timestamp.CopyFrom(Timestamp(seconds=-(2**62)))
            elif value == "max":
                msg.timestamp.CopyFrom(Timestamp(seconds=2**63 - 1, nanos=999_999_999))
            elif isinstance(value, tuple):  # ("nanos", n): a second ago, nanos n
                msg.timestamp.CopyFrom(Timestamp(seconds=int(time.time()) - 1, nanos=value[1]))
            else:
                msg.timestamp.CopyFrom(ts(time.time() + float(value)))
        else:
            setattr(msg, name, value)
    return msg


def check_batch_outcome(
    ack: pb.PushSamplesResponse | pb.StreamSamplesResponse, bad_at: list[int], field: str, rule: str
) -> None:
    """Only the samples at ``bad_at`` were rejected, each naming ``field`` and ``rule``."""
    assert ack.rejected == len(bad_at)
    assert sorted(r.index for r in ack.rejections) == bad_at
    for r in ack.rejections:
        assert r.field == field, r
        assert field in r.reason and rule in r.reason, r.reason


class TestSampleValues:
    """NaN, infinities, negatives, out-of-range values and bad timestamps."""

    @pytest.mark.parametrize(("name", "fields", "field", "rule"), VALUE_CASES)
    def test_unary(
        self, client: Client, name: str, fields: dict[str, Any], field: str, rule: str
    ) -> None:
        """PushSamples rejects the bad value naming field and rule, keeps the good
        sample, leaves the stored peer unchanged and creates no peer for it."""
        peer, ghost, fresh = stored(client), uid(f"ghost-{name}"), uid(f"fresh-{name}")
        before = state(client, peer)
        ack = client.push([bad_sample(peer, fields), bad_sample(ghost, fields), good(fresh)])
        assert ack.accepted == 1
        check_batch_outcome(ack, [0, 1], field, rule)
        assert state(client, peer) == before
        assert_absent(client, ghost)
        assert client.peer(fresh).sample_count == 1

    @pytest.mark.parametrize(("name", "fields", "field", "rule"), VALUE_CASES)
    def test_stream(
        self, client: Client, name: str, fields: dict[str, Any], field: str, rule: str
    ) -> None:
        """StreamSamples rejects the bad value per sample and the stream carries
        on: the following batch on the same stream is accepted."""
        peer, ghost = stored(client), uid(f"sghost-{name}")
        before = state(client, peer)
        later = uid(f"later-{name}")
        acks = list(
            client.stream(
                [
                    [bad_sample(ghost, fields), bad_sample(peer, fields)],
                    [good(later), good(later, 11.0)],
                ]
            )
        )
        assert len(acks) == 2
        assert acks[0].accepted == 0
        check_batch_outcome(acks[0], [0, 1], field, rule)
        assert (acks[1].accepted, acks[1].rejected) == (2, 0)
        assert state(client, peer) == before
        assert_absent(client, ghost)
        assert client.peer(later).sample_count == 2


class TestPeerIds:
    """Empty, over-long, non-ASCII, whitespace and control-character ids."""

    @pytest.mark.parametrize(("name", "peer_id"), BAD_IDS)
    def test_sample_with_bad_id(self, client: Client, name: str, peer_id: str) -> None:
        """A sample with the id is rejected naming peer_id and the rule, on both
        ingest paths; no peer is created and the good neighbour is kept."""
        fresh = uid(f"id-{name}")
        ack = client.push([good(peer_id), good(fresh)])
        assert (ack.accepted, ack.rejected) == (1, 1)
        (rej,) = ack.rejections
        assert rej.index == 0 and rej.field == "peer_id" and "1-128" in rej.reason
        # The reason quotes the id with ascii(): no raw control characters and
        # never more than ~40 characters of it, whatever was sent.
        assert rej.reason.isprintable() and len(rej.reason) < 200
        (sack,) = client.stream([[good(fresh, 12.0), good(peer_id)]])
        assert (sack.accepted, sack.rejected) == (1, 1)
        assert sack.rejections[0].index == 1 and sack.rejections[0].field == "peer_id"
        assert peer_id not in {p.peer_id for p in client.peers()}

    @pytest.mark.parametrize(("name", "peer_id"), BAD_IDS)
    def test_lookups_with_bad_id(self, client: Client, name: str, peer_id: str) -> None:
        """GetPeer, Forecast and Allocate with the id answer INVALID_ARGUMENT naming the field."""
        calls = [
            ("peer_id", lambda: client.peer(peer_id)),
            ("peer_ids[0]", lambda: client.forecast([peer_id])),
            ("peer_ids[0]", lambda: client.allocate([peer_id])),
        ]
        for field, call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith(f"{field}:")

    def test_128_chars_and_every_allowed_character(self, client: Client) -> None:
        """An id of exactly 128 characters using every allowed character is accepted."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/-"
        peer = (alphabet * 2)[:128]
        assert client.push([good(peer)]).accepted == 1
        assert client.peer(peer).peer_id == peer

    def test_bad_page_token(self, client: Client) -> None:
        """ListPeers with a page token breaking the id rule answers INVALID_ARGUMENT naming it."""
        with pytest.raises(grpc.RpcError) as err:
            client.stub.ListPeers(pb.ListPeersRequest(page_token="a b"), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (err.value.details() or "")


class TestBatchLimits:
    """Batches over max_batch_samples and messages over max_message_bytes."""

    def test_unary_batch_too_large(self, client: Client) -> None:
        """PushSamples with max_batch_samples + 1 samples answers INVALID_ARGUMENT
        naming ``samples`` and stores none of them."""
        peer = stored(client)
        before = state(client, peer)
        fresh = uid("too-many")
        batch = [good(fresh, float(i)) for i in range(MAX_BATCH)] + [good(peer, 99.0)]
        with pytest.raises(grpc.RpcError) as err:
            client.push(batch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = err.value.details() or ""
        assert details.startswith("samples:") and str(MAX_BATCH) in details
        assert state(client, peer) == before
        assert_absent(client, fresh)
        assert client.push(batch[:MAX_BATCH]).accepted == MAX_BATCH

    def test_stream_batch_too_large(self, client: Client) -> None:
        """On a stream, an oversize batch is rejected sample by sample (field
        ``samples``) and the next batch on the same stream is accepted."""
        peer = stored(client)
        before = state(client, peer)
        fresh, after = uid("s-too-many"), uid("s-after")
        big = [good(fresh, float(i)) for i in range(MAX_BATCH)] + [good(peer, 99.0)]
        acks = list(client.stream([big, [good(after)]]))
        assert (acks[0].accepted, acks[0].rejected) == (0, MAX_BATCH + 1)
        assert sorted(r.index for r in acks[0].rejections) == list(range(MAX_BATCH + 1))
        assert {r.field for r in acks[0].rejections} == {"samples"}
        assert (acks[1].accepted, acks[1].rejected) == (1, 0)
        assert state(client, peer) == before
        assert_absent(client, fresh)

    def test_unary_message_too_large(self, client: Client) -> None:
        """A request over max_message_bytes fails RESOURCE_EXHAUSTED in gRPC,
        stores nothing and the daemon keeps serving."""
        peer = stored(client)
        before = state(client, peer)
        big = pb.Sample(peer_id="x" * (MAX_MESSAGE + 1), bandwidth_mbps=1.0)
        with pytest.raises(grpc.RpcError) as err:
            client.push([good(peer, 99.0), big])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.health() == "SERVING"
        assert state(client, peer) == before
        fresh = uid("after-big")
        assert client.push([good(fresh)]).accepted == 1

    def test_stream_message_too_large(self, client: Client) -> None:
        """An oversize message on a stream ends that stream with
        RESOURCE_EXHAUSTED (gRPC cannot skip one message); batches acked
        before it stay stored and the daemon keeps serving."""
        peer = uid("s-big")
        big = pb.Sample(peer_id="y" * (MAX_MESSAGE + 1), bandwidth_mbps=1.0)
        acks: list[pb.StreamSamplesResponse] = []
        with pytest.raises(grpc.RpcError) as err:
            acks.extend(client.stream([[good(peer)], [big], [good(peer, 2.0)]]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert client.peer(peer).sample_count == 1
        assert client.health() == "SERVING"


class TestLookups:
    """Forecast/Allocate peer lists: duplicates, unknown peers, limits."""

    def test_duplicate_ids(self, client: Client) -> None:
        """A duplicate id answers INVALID_ARGUMENT naming its index and the first one."""
        a, b = stored(client), stored(client)
        for call in (client.forecast, client.allocate):
            with pytest.raises(grpc.RpcError) as err:
                call([a, b, a])
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = err.value.details() or ""
            assert details.startswith("peer_ids[2]:") and "peer_ids[0]" in details

    def test_unknown_peer(self, client: Client) -> None:
        """An unknown peer among known ones answers NOT_FOUND naming it; GetPeer too."""
        a = stored(client)
        ghost = uid("never-pushed")
        for call in (
            lambda: client.forecast([a, ghost]),
            lambda: client.allocate([ghost, a]),
            lambda: client.peer(ghost),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert ghost in (err.value.details() or "")

    def test_empty_and_too_many(self, client: Client) -> None:
        """No ids, or more than max_batch_peers, answer INVALID_ARGUMENT naming peer_ids."""
        for ids in ([], [f"p{i}" for i in range(MAX_BATCH_PEERS + 1)]):
            with pytest.raises(grpc.RpcError) as err:
                client.forecast(ids)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (err.value.details() or "").startswith("peer_ids:")


class TestTimestamps:
    """Future, past and out-of-order timestamps."""

    def test_window_edges(self, client: Client) -> None:
        """Timestamps just inside the future/past limits are accepted."""
        now = time.time()
        a, b = uid("edge-past"), uid("edge-future")
        ack = client.push([good(a, at=now - AGE_S + 60), good(b, at=now + SKEW_S - 60)])
        assert (ack.accepted, ack.rejected) == (2, 0)

    def test_older_than_stored_rejected(self, client: Client) -> None:
        """A sample older than the peer's newest stored one is rejected as out of
        order; one with an equal timestamp is accepted."""
        peer = uid("order")
        t = time.time() - 10
        assert client.push([good(peer, 1.0, at=t)]).accepted == 1
        before = state(client, peer)
        ack = client.push([good(peer, 2.0, at=t - 1)])
        assert ack.accepted == 0
        check_batch_outcome(ack, [0], "timestamp", "out of order")
        assert state(client, peer) == before
        assert client.push([good(peer, 3.0, at=t)]).accepted == 1
        assert [s.bandwidth_mbps for s in client.peer(peer).window] == [1.0, 3.0]

    def test_out_of_order_inside_batch(self, client: Client) -> None:
        """Inside one batch a sample older than an earlier one of its peer is
        rejected; other peers' samples are judged on their own."""
        p, q = uid("inb-p"), uid("inb-q")
        t = time.time() - 100
        ack = client.push(
            [
                good(p, 1.0, at=t + 2),
                good(q, 1.0, at=t + 5),
                good(p, 2.0, at=t + 1),
                good(q, 2.0, at=t + 6),
                good(p, 3.0, at=t + 3),
            ]
        )
        assert ack.accepted == 4
        check_batch_outcome(ack, [2], "timestamp", "out of order")
        assert [s.bandwidth_mbps for s in client.peer(p).window] == [1.0, 3.0]

    def test_new_peer_out_of_order_only_first_kept(self, client: Client) -> None:
        """A new peer whose batch runs backwards keeps just its first sample."""
        p = uid("backwards")
        t = time.time() - 50
        ack = client.push([good(p, float(i), at=t - i) for i in range(5)])
        assert ack.accepted == 1
        check_batch_outcome(ack, [1, 2, 3, 4], "timestamp", "out of order")
        assert client.peer(p).sample_count == 1

    def test_future_within_skew_holds_back_arrival_stamps(self, client: Client) -> None:
        """A timestamp ahead of the server clock but within the skew is accepted,
        and then an untimed sample (stamped with arrival time, which is earlier)
        is out of order for that peer until the clock passes it."""
        p = uid("ahead")
        assert client.push([good(p, 1.0, at=time.time() + 60)]).accepted == 1
        ack = client.push([good(p, 2.0)])
        assert ack.accepted == 0
        check_batch_outcome(ack, [0], "timestamp", "out of order")

    def test_malformed_timestamp_fields(self, client: Client) -> None:
        """Out-of-range nanos (negative, a second or more) are rejected naming
        timestamp and the [0, 1e9) rule, not read as a shifted time (2e9
        nanos would move the sample 2 s); the edges 0 and 999999999 pass."""
        p = uid("nanos")
        now = int(time.time()) - 100
        ack = client.push(
            [
                pb.Sample(peer_id=p, bandwidth_mbps=bw, timestamp=Timestamp(seconds=now, nanos=n))
                for bw, n in ((1.0, -1), (2.0, 2_000_000_000), (3.0, 0), (4.0, 999_999_999))
            ]
        )
        assert ack.accepted == 2
        check_batch_outcome(ack, [0, 1], "timestamp", "nanos must be within [0, 999999999]")
        assert [r.reason.rsplit(" ", 1)[-1] for r in ack.rejections] == ["-1", "2000000000"]
        window = client.peer(p).window
        assert [s.bandwidth_mbps for s in window] == [3.0, 4.0]
        got = [s.timestamp.seconds + s.timestamp.nanos * 1e-9 for s in window]
        assert got == pytest.approx([now, now + 0.999999999], abs=1e-6)


class TestEverythingAtOnce:
    """Every bad sample of the catalogue in one batch."""

    def test_catalogue_batch(self, client: Client) -> None:
        """One batch holding every bad case for a stored peer rejects each with
        its own field, keeps the stored peer unchanged and its good samples."""
        peer = stored(client)
        before = state(client, peer)
        bad = [bad_sample(peer, fields) for _, fields, _, _ in VALUE_CASES]
        bad += [good(pid) for _, pid in BAD_IDS if len(pid) < 1000]
        ack = client.push(bad)
        assert ack.accepted == 0 and ack.rejected == len(bad)
        fields = [r.field for r in sorted(ack.rejections, key=lambda r: r.index)]
        assert fields[: len(VALUE_CASES)] == [case[2] for case in VALUE_CASES]
        assert set(fields[len(VALUE_CASES) :]) == {"peer_id"}
        assert state(client, peer) == before
