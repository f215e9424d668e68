"""Property tests and fuzzing of the ingest decode/validate path.

Samples with any floats (NaN, infinities, subnormals, huge), any text ids and
any timestamps go through exactly what the server does with a request
(``PushSamplesRequest.FromString`` -> ``extract_batch`` -> ``Core.ingest``) on a
Core built directly, and are checked against a small independent model of the
rules: the same samples are accepted, the same field is blamed, and the stored
windows equal the model's, value for value. Raw bytes that are not valid
protobuf are fed to the decoder (a ``DecodeError`` is gRPC's business) and,
through a generic channel with identity serializers, to a real server.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from bwpredd.client import Client, pb
from bwpredd.config import Config
from bwpredd.core import Core
from bwpredd.engine import Engine
from bwpredd.errors import InvalidArgument, PeerNotFound
from bwpredd.metrics import Metrics
from bwpredd.server import Server
from bwpredd.servicer import SERVICE_NAME, extract_batch
from tests.helpers import running_server

NOW = 1_800_000_000.0
SKEW_S = 300.0
AGE_S = 86_400.0
MAX_BATCH = 64
CAPACITY = 512
VALID_ID = re.compile(r"[A-Za-z0-9._:@/-]{1,128}")
FIELDS = {
    "peer_id",
    "bandwidth_mbps",
    "latency_ms",
    "packet_loss",
    "reliability",
    "timestamp",
    "samples",
}

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def make_core() -> Core:
    config = Config(
        listen="unix:/nonexistent/fuzz.sock",
        metrics_addr="",
        max_peers=CAPACITY,
        max_batch_samples=MAX_BATCH,
        max_future_skew_s=SKEW_S,
        max_sample_age_s=AGE_S,
    )
    return Core(config, Engine(None), Metrics(CollectorRegistry()), clock=lambda: NOW)


# -- strategies ---------------------------------------------------------------------------

EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1e-45,
    0.5,
    1.0,
    1.0000000000000002,
    0.9999999999999999,
    600_000.0,
    600_000.00000000012,
    1e7,
    10_000_000.000000002,
    3.4028235e38,
    1.7976931348623157e308,
    -1.0,
    math.nan,
    math.inf,
    -math.inf,
]
any_float = st.one_of(
    st.floats(),  # everything, NaN/inf/subnormal included
    st.sampled_from(EDGE_FLOATS),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1e7),
)
peer_ids = st.one_of(
    st.sampled_from(["a", "b", "peer-1.dc:443", "n@x/y"]),  # repeats, so windows fill
    st.from_regex(VALID_ID, fullmatch=True),
    st.text(max_size=130),
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=6),
)
seconds = st.one_of(
    st.integers(int(NOW - AGE_S) - 5, int(NOW + SKEW_S) + 5),
    st.integers(int(NOW) - 60, int(NOW) + 60),
    st.integers(-(2**63), 2**63 - 1),
)
nanos = st.one_of(st.integers(0, 999_999_999), st.integers(-(2**31), 2**31 - 1))
timestamps = st.one_of(st.none(), st.builds(Timestamp, seconds=seconds, nanos=nanos))


@st.composite
def samples(draw: st.DrawFn) -> pb.Sample:
    msg = pb.Sample(peer_id=draw(peer_ids))
    for name in ("bandwidth_mbps", "latency_ms", "packet_loss", "reliability"):
        # bandwidth is given more often than not, the others half the time
        if draw(st.integers(0, 3 if name == "bandwidth_mbps" else 1)):
            setattr(msg, name, draw(any_float))
    t = draw(timestamps)
    if t is not None:
        msg.timestamp.CopyFrom(t)
    return msg


@st.composite
def plausible(draw: st.DrawFn) -> pb.Sample:
    """A sample that is usually valid: few peers, close timestamps, values in
    range, optional fields often absent (so carry-forward and the time-order
    rule get exercised, not just the value rules)."""
    msg = pb.Sample(
        peer_id=draw(st.sampled_from(["a", "b", "c"])),
        bandwidth_mbps=draw(st.one_of(st.floats(0.0, 1e7), st.sampled_from([0.0, 1e7]))),
    )
    if draw(st.booleans()):
        msg.latency_ms = draw(st.floats(0.0, 600_000.0))
    for name in ("packet_loss", "reliability"):
        if draw(st.booleans()):
            setattr(msg, name, draw(st.floats(0.0, 1.0)))
    if draw(st.booleans()):
        msg.timestamp.CopyFrom(
            Timestamp(
                seconds=draw(st.integers(int(NOW) - 3, int(NOW) + 3)),
                nanos=draw(st.sampled_from([0, 1, 500_000_000, 999_999_999])),
            )
        )
    return msg


mixed = st.one_of(plausible(), plausible(), samples())
batches = st.lists(st.lists(mixed, max_size=16), min_size=1, max_size=4)


# -- an independent model of the rules ----------------------------------------------------


@dataclass
class PeerModel:
    rows: deque[tuple[np.ndarray, float]] = field(default_factory=lambda: deque(maxlen=10))
    total: int = 0
    last_ts: float = -math.inf


def first_broken_rule(s: pb.Sample, known: bool) -> str | None:
    """The field of the first rule ``s`` breaks, in validate.py's order."""
    if not known and VALID_ID.fullmatch(s.peer_id) is None:
        return "peer_id"
    if not s.HasField("bandwidth_mbps"):
        return "bandwidth_mbps"
    bw = s.bandwidth_mbps
    if not math.isfinite(bw) or bw < 0 or bw > 1e7:
        return "bandwidth_mbps"
    if s.HasField("latency_ms"):
        lat = s.latency_ms
        if not math.isfinite(lat) or lat < 0 or lat > 600_000:
            return "latency_ms"
    for name in ("packet_loss", "reliability"):
        if s.HasField(name):
            v = getattr(s, name)
            if not math.isfinite(v) or v < 0 or v > 1:
                return name
    if s.HasField("timestamp") and not 0 <= s.timestamp.nanos < 1_000_000_000:
        return "timestamp"
    t = when(s)
    if not math.isfinite(t) or t > NOW + SKEW_S or t < NOW - AGE_S:
        return "timestamp"
    return None


def when(s: pb.Sample) -> float:
    return s.timestamp.seconds + s.timestamp.nanos * 1e-9 if s.HasField("timestamp") else NOW


class StoreModel:
    """What the daemon should hold after each batch (capacity is never reached)."""

    def __init__(self, defaults: tuple[float, ...]) -> None:
        self.defaults = np.asarray(defaults, dtype=np.float32)
        self.peers: dict[str, PeerModel] = {}

    def ingest(self, batch: list[pb.Sample]) -> tuple[list[int], dict[int, str]]:
        accepted: list[int] = []
        blamed: dict[int, str] = {}
        for i, s in enumerate(batch):
            bad = first_broken_rule(s, s.peer_id in self.peers)
            if bad is None and when(s) < self.peers.get(s.peer_id, PeerModel()).last_ts:
                bad = "timestamp"
            if bad is not None:
                blamed[i] = bad
                continue
            peer = self.peers.setdefault(s.peer_id, PeerModel())
            prev = peer.rows[-1][0] if peer.rows else self.defaults
            given = [
                s.latency_ms if s.HasField("latency_ms") else None,
                s.bandwidth_mbps,
                s.packet_loss if s.HasField("packet_loss") else None,
                s.reliability if s.HasField("reliability") else None,
            ]
            row = np.array(
                [prev[k] if v is None else np.float32(v) for k, v in enumerate(given)],
                dtype=np.float32,
            )
            peer.rows.append((row, when(s)))
            peer.total += 1
            peer.last_ts = when(s)
            accepted.append(i)
        return accepted, blamed


def decode(batch: list[pb.Sample]) -> pb.PushSamplesRequest:
    """The request as the server sees it: serialized and parsed again."""
    return pb.PushSamplesRequest.FromString(
        pb.PushSamplesRequest(samples=batch).SerializeToString()
    )


def assert_store_valid(core: Core) -> None:
    """Every stored row is finite and within the rules; timestamps in range and ordered."""
    store = core.store
    ids = store.peer_ids()
    assert len(ids) <= CAPACITY
    if not ids:
        return
    slots = np.array([store.slot(p) for p in ids], dtype=np.int64)
    windows, counts = store.gather(slots)
    assert ((counts >= 1) & (counts <= 10)).all()
    real = np.arange(10)[None, :] >= (10 - counts)[:, None]
    rows = windows[real]
    assert np.isfinite(rows).all()
    lat, bw, loss, rel = rows.T
    assert ((lat >= 0) & (lat <= 600_000)).all()
    assert ((bw >= 0) & (bw <= 1e7)).all()
    assert ((loss >= 0) & (loss <= 1)).all() and ((rel >= 0) & (rel <= 1)).all()
    for pid in ids:
        assert VALID_ID.fullmatch(pid)
        view = store.view(pid)
        assert view is not None
        t = view.timestamps
        assert np.isfinite(t).all() and (t >= NOW - AGE_S).all() and (t <= NOW + SKEW_S).all()
        assert (np.diff(t) >= 0).all()


def assert_outcome_shape(n: int, accepted: int, rejections: list[tuple[int, str, str]]) -> None:
    idx = [i for i, _, _ in rejections]
    assert accepted + len(rejections) == n
    assert idx == sorted(set(idx)) and all(0 <= i < n for i in idx)
    for _, fld, reason in rejections:
        assert fld in FIELDS and reason.startswith(f"{fld}:")


# -- properties ------------------------------------------------------------------------------


class TestSampleProperties:
    """Arbitrary samples through decode -> extract_batch -> Core.ingest."""

    @FUZZ
    @given(batches)
    def test_matches_model(self, batches: list[list[pb.Sample]]) -> None:
        """Each batch accepts exactly the samples the rules allow, blames the
        model's field for the others, and the store equals the model afterwards."""
        core = make_core()
        model = StoreModel(core.engine.feature_defaults)
        for batch in batches:
            outcome = core.ingest(extract_batch(decode(batch).samples))
            assert_outcome_shape(len(batch), outcome.accepted, outcome.rejections)
            want_ok, want_bad = model.ingest(batch)
            assert outcome.accepted == len(want_ok)
            assert {i: f for i, f, _ in outcome.rejections} == want_bad
            assert_store_valid(core)
            assert set(core.store.peer_ids()) == set(model.peers)
            for pid, pm in model.peers.items():
                view = core.store.view(pid)
                assert view is not None and view.sample_count == pm.total
                np.testing.assert_array_equal(view.window, np.stack([r for r, _ in pm.rows]))
                np.testing.assert_array_equal(view.timestamps, [t for _, t in pm.rows])

    @settings(FUZZ, max_examples=50)
    @given(st.lists(mixed, min_size=1, max_size=5), st.integers(1, 5))
    def test_oversize_batch_stores_nothing(self, part: list[pb.Sample], extra: int) -> None:
        """A batch over max_batch_samples raises InvalidArgument naming samples
        and leaves the store empty, whatever it holds."""
        core = make_core()
        batch = (part * (MAX_BATCH // len(part) + 1) + part[:1] * extra)[: MAX_BATCH + extra]
        assert len(batch) > MAX_BATCH
        with pytest.raises(InvalidArgument) as err:
            core.ingest(extract_batch(decode(batch).samples))
        assert err.value.field == "samples"
        assert len(core.store) == 0

    @FUZZ
    @given(st.lists(st.text(max_size=140), max_size=6), st.text(max_size=140))
    def test_lookups(self, ids: list[str], one: str) -> None:
        """Forecast, Allocate, GetPeer and ListPeers with any ids raise only the
        domain errors (INVALID_ARGUMENT / NOT_FOUND), never anything else."""
        core = make_core()
        core.ingest(extract_batch([pb.Sample(peer_id="a", bandwidth_mbps=1.0)]))
        for call in (
            lambda: core.forecast(ids),
            lambda: core.allocate(ids),
            lambda: core.peer(one),
            lambda: core.list_peers(0, one),
        ):
            with contextlib.suppress(InvalidArgument, PeerNotFound):
                call()


# -- raw bytes ----------------------------------------------------------------------------

VALID_REQUEST = pb.PushSamplesRequest(
    samples=[
        pb.Sample(
            peer_id="raw-1",
            bandwidth_mbps=10.0,
            latency_ms=3.0,
            packet_loss=0.1,
            reliability=0.9,
            timestamp=Timestamp(seconds=int(NOW) - 5, nanos=5),
        ),
        pb.Sample(peer_id="raw-2", bandwidth_mbps=20.0),
    ]
).SerializeToString()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with bytes flipped, cut, inserted or repeated."""
    data = bytearray(VALID_REQUEST)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            data += data[pos:]
    return bytes(data)


raw_bytes = st.one_of(st.binary(max_size=300), mutated())


def ingest_raw(core: Core, raw: bytes) -> None:
    """What the server does with raw bytes: decode, then ingest."""
    try:
        request = pb.PushSamplesRequest.FromString(raw)
    except DecodeError:
        return  # refused by the decoder: gRPC answers the call, nothing is ingested
    batch = extract_batch(request.samples)
    try:
        outcome = core.ingest(batch)
    except InvalidArgument as exc:
        assert exc.field == "samples" and len(batch) > MAX_BATCH
        return
    assert_outcome_shape(len(batch), outcome.accepted, outcome.rejections)


class TestRawBytes:
    """Bytes that are not (or not quite) a PushSamplesRequest."""

    @FUZZ
    @given(st.lists(raw_bytes, min_size=1, max_size=4))
    def test_decode_then_ingest(self, blobs: list[bytes]) -> None:
        """Decoding either fails with DecodeError or yields samples that ingest
        without an unhandled exception and leave only valid values stored."""
        core = make_core()
        for raw in blobs:
            ingest_raw(core, raw)
            assert_store_valid(core)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Client]]:
    with running_server(tmp_path_factory.mktemp("fuzz"), max_batch_samples=MAX_BATCH) as pair:
        yield pair


# What the server answers to bytes it cannot decode.
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT}
UNARY_RPCS = ["PushSamples", "Forecast", "Allocate", "GetPeer", "ListPeers", "Advise", "RankPeers"]
GARBAGE = [b"\xff\xff\xff", b"\x0a\x05\x0a\x03\xff\xfe\xfd", VALID_REQUEST[:-3]]


def raw_call(channel: grpc.Channel, method: str, raw: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    call = channel.unary_unary(
        f"/{SERVICE_NAME}/{method}", request_serializer=None, response_deserializer=None
    )
    try:
        return grpc.StatusCode.OK, "", call(raw, timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", b""


class TestRawBytesOverTheWire:
    """Raw bytes sent to the real server with identity serializers."""

    def test_undecodable_answered_not_fatal(self, daemon: tuple[Server, Client]) -> None:
        """Bytes the decoder refuses fail the call with INVALID_ARGUMENT naming
        the message type (grpcio alone answers UNKNOWN "Unexpected
        DecodeError"), store nothing, and the daemon keeps serving."""
        server, client = daemon
        assert server.core is not None
        before = len(server.core.store)
        for raw in GARBAGE:
            code, details, _ = raw_call(client.channel, "PushSamples", raw)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert details.startswith("request: not a valid bwpred.v1.PushSamplesRequest message")
        assert len(server.core.store) == before
        assert client.health() == "SERVING"

    @pytest.mark.parametrize("method", UNARY_RPCS)
    def test_every_unary_rpc_invalid_argument(
        self, daemon: tuple[Server, Client], method: str
    ) -> None:
        """Each unary RPC answers undecodable bytes INVALID_ARGUMENT, naming
        its own request type."""
        _, client = daemon
        code, details, _ = raw_call(client.channel, method, GARBAGE[0])
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert f"bwpred.v1.{method}Request" in details

    def test_watch_forecasts_invalid_argument(self, daemon: tuple[Server, Client]) -> None:
        """WatchForecasts (server stream) answers an undecodable request
        INVALID_ARGUMENT and opens no watcher."""
        server, client = daemon
        call = client.channel.unary_stream(f"/{SERVICE_NAME}/WatchForecasts")
        with pytest.raises(grpc.RpcError) as err:
            list(call(GARBAGE[0], timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bwpred.v1.WatchForecastsRequest" in (err.value.details() or "")
        assert server.core is not None and len(server.core.watch) == 0

    def test_stream_bad_message_in_the_middle(self, daemon: tuple[Server, Client]) -> None:
        """On StreamSamples the batches before an undecodable message are
        acked and stored; the undecodable one ends the stream INVALID_ARGUMENT
        and nothing after it is read."""
        _, client = daemon
        call = client.channel.stream_stream(f"/{SERVICE_NAME}/StreamSamples")

        def batch(peer: str) -> bytes:
            return pb.StreamSamplesRequest(
                samples=[pb.Sample(peer_id=peer, bandwidth_mbps=5.0)]
            ).SerializeToString()

        acks: list[pb.StreamSamplesResponse] = []
        with pytest.raises(grpc.RpcError) as err:
            for raw in call(iter([batch("mid-1"), GARBAGE[1], batch("mid-2")]), timeout=10):
                acks.append(pb.StreamSamplesResponse.FromString(raw))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bwpred.v1.StreamSamplesRequest" in (err.value.details() or "")
        assert [(a.accepted, a.rejected) for a in acks] == [(1, 0)]
        assert client.peer("mid-1").sample_count == 1
        with pytest.raises(grpc.RpcError):
            client.peer("mid-2")
        assert client.health() == "SERVING"

    @settings(max_examples=40, deadline=None, database=None)
    @given(raw=raw_bytes, method=st.sampled_from(["PushSamples", "Forecast", "GetPeer"]))
    def test_any_bytes(self, daemon: tuple[Server, Client], raw: bytes, method: str) -> None:
        """Any bytes to PushSamples, Forecast or GetPeer end in an answer, a
        decode refusal or a domain error; never an internal error; the daemon
        stays up and holds only valid peers."""
        server, client = daemon
        code, details, body = raw_call(client.channel, method, raw)
        assert code in {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND} | REFUSED, (code, details)
        assert "internal error" not in details
        if code == grpc.StatusCode.OK and method == "PushSamples":
            ack = pb.PushSamplesResponse.FromString(body)
            assert all(r.field in FIELDS for r in ack.rejections)
        assert client.health() == "SERVING"
        assert server.core is not None
        assert all(VALID_ID.fullmatch(p.peer_id) for p in client.peers())


class TestUndecodableLogging:
    """A client sending garbage costs the journal one line per interval."""

    def test_one_line_no_traceback(self, tmp_path: Path) -> None:
        """60 undecodable requests on every RPC shape write one
        undecodable_request warning and no error or traceback, while each is
        counted INVALID_ARGUMENT in the metrics."""
        with capture_logs() as logs, running_server(tmp_path) as (server, client):
            for _ in range(20):
                raw_call(client.channel, "PushSamples", GARBAGE[0])
                stream = client.channel.stream_stream(f"/{SERVICE_NAME}/StreamSamples")
                with pytest.raises(grpc.RpcError):
                    list(stream(iter([GARBAGE[1]]), timeout=10))
                watch = client.channel.unary_stream(f"/{SERVICE_NAME}/WatchForecasts")
                with pytest.raises(grpc.RpcError):
                    list(watch(GARBAGE[2], timeout=10))
            registry = server.registry
        lines = [e for e in logs if e["event"] == "undecodable_request"]
        assert len(lines) == 1
        assert lines[0]["log_level"] == "warning" and lines[0]["suppressed"] == 0
        assert lines[0]["rpc"] == "PushSamples"
        assert not [e for e in logs if e["log_level"] in ("error", "critical")]
        assert not [e for e in logs if "exc_info" in e or "exception" in e]
        assert not [e for e in logs if e["event"] == "rpc"]  # log_rpcs off
        for method, kind in (
            ("PushSamples", "unary"),
            ("StreamSamples", "bidi_stream"),
            ("WatchForecasts", "server_stream"),
        ):
            labels = {
                "grpc_service": SERVICE_NAME,
                "grpc_method": method,
                "grpc_type": kind,
                "grpc_code": "INVALID_ARGUMENT",
            }
            assert registry.get_sample_value("grpc_server_handled_total", labels) == 20
