"""End to end through a real server and the generated stubs."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from bwpredd.client import Client, channel_for, pb
from tests.helpers import daemon_process, running_server, sample, wait_for_health

MODEL = pb.FORECAST_SOURCE_MODEL
COLD = pb.FORECAST_SOURCE_BASELINE_COLD_START


def _push_25(client: Client) -> pb.PushSamplesResponse:
    """25 samples over 3 peers: p0 gets 9, p1 8, p2 8 ... then top p0 up."""
    samples = [sample(f"p{i % 3}", 50.0 + i, latency_ms=20.0 + i % 4) for i in range(25)]
    return client.push(samples)


class TestUnixSocket:
    """The daemon on a temporary unix socket."""

    def test_push_forecast_allocate(self, tmp_path: Path) -> None:
        """25 samples for 3 peers are accepted; full windows get MODEL
        forecasts with low <= point <= high, short ones cold start."""
        with running_server(tmp_path) as (_, client):
            resp = _push_25(client)
            assert (resp.accepted, resp.rejected) == (25, 0)
            client.push([sample("p1", 60.0), sample("p1", 61.0)])  # p1: 8 -> 10
            forecasts = client.forecast(["p1", "p0"])
            assert [f.peer_id for f in forecasts] == ["p1", "p0"]
            full, short = forecasts
            assert full.source == MODEL and full.samples_in_window == 10
            assert math.isfinite(full.bandwidth_mbps)
            assert full.low_mbps <= full.bandwidth_mbps <= full.high_mbps
            assert full.model_version
            assert short.source == COLD and short.samples_in_window == 9
            allocations = client.allocate(["p1", "p0"])
            for a in allocations:
                assert 0 <= a.action <= 9
                assert a.allocation_percent == (a.action + 1) * 10
                assert a.allocated_mbps == pytest.approx(
                    a.allocation_percent / 100 * a.reference_capacity_mbps, rel=1e-5
                )
            assert allocations[0].source == MODEL

    def test_mixed_bad_batch(self, tmp_path: Path) -> None:
        """NaN, negative bandwidth, loss 1.5 and an empty peer id are rejected
        with reasons naming the field; the good sample is kept."""
        with running_server(tmp_path) as (_, client):
            resp = client.push(
                [
                    sample("a", math.nan),
                    sample("a", -1.0),
                    sample("a", 10.0, packet_loss=1.5),
                    sample("", 10.0),
                    sample("good", 10.0),
                ]
            )
            assert (resp.accepted, resp.rejected) == (1, 4)
            by_index = {r.index: r for r in resp.rejections}
            assert by_index[0].field == "bandwidth_mbps" and "finite" in by_index[0].reason
            assert by_index[1].field == "bandwidth_mbps" and ">= 0" in by_index[1].reason
            assert by_index[2].field == "packet_loss" and "[0, 1]" in by_index[2].reason
            assert by_index[3].field == "peer_id"
            assert [p.peer_id for p in client.peers()] == ["good"]

    def test_unknown_peer_not_found(self, tmp_path: Path) -> None:
        """Forecast, Allocate and GetPeer of an unknown peer answer NOT_FOUND naming it."""
        with running_server(tmp_path) as (_, client):
            client.push([sample("known", 1.0)])
            for call in (
                lambda: client.forecast(["known", "ghost"]),
                lambda: client.allocate(["ghost"]),
                lambda: client.peer("ghost"),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                assert "ghost" in (err.value.details() or "")

    def test_stream_acks_every_batch(self, tmp_path: Path) -> None:
        """StreamSamples answers one ack per batch, in order, and a bad sample
        does not end the stream."""
        with running_server(tmp_path) as (_, client):
            batches = [
                [sample("s", 10.0 + i), sample("s", -5.0)] if i % 2 else [sample("s", 10.0 + i)]
                for i in range(6)
            ]
            acks = list(client.stream(batches))
            assert [(a.accepted, a.rejected) for a in acks] == [(1, 0), (1, 1)] * 3
            assert client.peer("s").sample_count == 6

    def test_health_and_peer(self, tmp_path: Path) -> None:
        """Health is SERVING overall and for the service; GetPeer returns the
        window oldest first with counts."""
        with running_server(tmp_path) as (_, client):
            assert client.health() == "SERVING"
            assert client.health("bwpred.v1.BandwidthPredictorService") == "SERVING"
            assert client.health("bwpredd.model") == "SERVING"
            client.push([sample("w", float(i), latency_ms=1.0) for i in range(12)])
            peer = client.peer("w")
            assert peer.sample_count == 12 and peer.samples_in_window == 10
            assert [s.bandwidth_mbps for s in peer.window] == [float(i) for i in range(2, 12)]
            assert peer.last_seen.seconds > 0

    def test_socket_permissions(self, tmp_path: Path) -> None:
        """The socket is mode 0660 inside a 0750 directory."""
        with running_server(tmp_path) as (server, _):
            path = Path(server.address.removeprefix("unix:"))
            assert path.stat().st_mode & 0o777 == 0o660
            assert path.parent.stat().st_mode & 0o777 == 0o750


class TestStoredPrecision:
    """Windows hold float32, as the README and the proto say for GetPeer."""

    def test_get_peer_returns_float32_rounded_values(self, tmp_path: Path) -> None:
        """An acknowledged 9999999.9 reads back as 10000000.0, the nearest
        float32, and every value is within 2^-24 relative of what was sent;
        the README and the proto's GetPeer comments say so."""
        sent = [9_999_999.9, 0.3, 123.456789, 1e-3]
        with running_server(tmp_path) as (_, client):
            ack = client.push([sample("f32", bw, latency_ms=0.1) for bw in sent])
            assert ack.accepted == 4
            window = client.peer("f32").window
        got = [s.bandwidth_mbps for s in window]
        assert got[0] == 10_000_000.0
        assert got == [float(np.float32(x)) for x in sent]
        assert {s.latency_ms for s in window} == {float(np.float32(0.1))}
        assert all(abs(g - x) <= x * 2**-24 for g, x in zip(got, sent, strict=True))
        root = Path(__file__).parents[2]
        proto = (root / "proto" / "bwpred" / "v1" / "bwpred.proto").read_text()
        rpc = proto[proto.index("// GetPeer returns") : proto.index("rpc GetPeer(")]
        assert "float32" in rpc and "2^-24" in rpc
        readme = (root / "README.md").read_text()
        assert "9999999.9 reads back as\n10000000.0" in readme


class TestTcp:
    """The daemon on TCP port 0."""

    def test_tcp_port_zero(self, tmp_path: Path) -> None:
        """Binding port 0 on loopback serves the same API on the chosen port."""
        with running_server(tmp_path, listen="127.0.0.1:0", allow_insecure_tcp=True) as (
            server,
            client,
        ):
            assert not server.address.endswith(":0")
            client.push([sample("t", 5.0 + i) for i in range(10)])
            (fc,) = client.forecast(["t"])
            assert fc.source == MODEL


class TestProcess:
    """The daemon as a separate process."""

    def test_sigterm_exits_zero(self, tmp_path: Path) -> None:
        """SIGTERM drains and exits 0, removing the socket."""
        sock = tmp_path / "d" / "bwpredd.sock"
        with daemon_process([], env={"BWPREDD_LISTEN": f"unix:{sock}"}) as proc:
            client = wait_for_health(f"unix:{sock}")
            client.push([sample("x", 1.0)])
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert not sock.exists()

    def test_open_health_watch_does_not_hold_shutdown(self, tmp_path: Path) -> None:
        """A client watching health hears NOT_SERVING, its stream ends OK and
        the daemon exits without waiting out a 120 s grace period."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        sock = tmp_path / "d" / "bwpredd.sock"
        env = {"BWPREDD_LISTEN": f"unix:{sock}", "BWPREDD_GRACE_PERIOD_S": "120"}
        with daemon_process([], env=env) as proc:
            wait_for_health(f"unix:{sock}").close()
            with grpc.insecure_channel(f"unix:{sock}") as channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service=""), timeout=60
                )
                first = next(watch)
                proc.send_signal(signal.SIGTERM)
                rest = list(watch)  # raises if the stream ends with an error
                assert proc.wait(timeout=60) == 0
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        assert [r.status for r in rest] == [health_pb2.HealthCheckResponse.NOT_SERVING]

    def test_bad_config_exit_code(self, tmp_path: Path) -> None:
        """An unknown BWPREDD_ variable stops start-up with exit code 2 naming it."""
        with daemon_process([], env={"BWPREDD_NO_SUCH_THING": "1"}) as proc:
            out = proc.communicate(timeout=30)[0].decode()
            assert proc.returncode == 2
            assert "no_such_thing" in out


def test_channel_to_missing_socket_fails(tmp_path: Path) -> None:
    """A client pointed at no daemon fails with UNAVAILABLE, not a hang."""
    client = Client(channel_for(f"unix:{tmp_path}/none.sock"), timeout=1)
    with pytest.raises(grpc.RpcError) as err:
        client.health()
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class TestAllocationState:
    def test_step_length_comes_from_the_samples_times(self, tmp_path: Path) -> None:
        """Two peers with the same window sampled every 0.5 s and every 5 s
        get the allocations the in-process Predictor gives for those step
        lengths: the daemon reads the step from the samples' timestamps."""
        import numpy as np
        from google.protobuf.timestamp_pb2 import Timestamp

        from bwpredd import Predictor

        rng = np.random.default_rng(3)
        window = np.zeros((10, 4), dtype=np.float32)
        window[:, 0] = 20.0 + np.r_[np.zeros(6), [150.0, 400.0, 900.0, 1500.0]]  # a queue
        window[:, 1] = rng.uniform(50, 150, 10)
        window[:, 3] = 1.0
        predictor = Predictor.load()
        start = time.time() - 60.0
        with running_server(tmp_path) as (_, client):
            for peer, step in (("fast", 0.5), ("slow", 5.0)):
                samples = []
                for i, (lat, bw, loss, rel) in enumerate(window.tolist()):
                    ts = Timestamp()
                    ts.FromNanoseconds(int((start + i * step) * 1e9))
                    samples.append(
                        sample(
                            peer,
                            bw,
                            latency_ms=lat,
                            packet_loss=loss,
                            reliability=rel,
                            timestamp=ts,
                        )
                    )
                assert client.push(samples).accepted == 10
            fast, slow = client.allocate(["fast", "slow"])
        assert fast.source == MODEL and slow.source == MODEL
        assert fast.action == predictor.decide_allocation(window, step_s=0.5)
        assert slow.action == predictor.decide_allocation(window, step_s=5.0)


class TestAnswerCache:
    """Forecasts are reused only while the window is unchanged."""

    def test_new_sample_refreshes_answer(self, tmp_path: Path) -> None:
        """Repeated Forecast/Allocate calls agree; a new sample changes the window's
        answer; an allocation follows its forecast."""
        with running_server(tmp_path) as (_, client):
            client.push([sample("c", 100.0, latency_ms=5.0) for _ in range(10)])
            first, again = client.forecast(["c"])[0], client.forecast(["c"])[0]
            assert first == again
            a1 = client.allocate(["c"])[0]
            client.push([sample("c", 5000.0, latency_ms=5.0)])
            after = client.forecast(["c"])[0]
            assert after.bandwidth_mbps != first.bandwidth_mbps
            a2 = client.allocate(["c"])[0]
            assert a2.reference_capacity_mbps > a1.reference_capacity_mbps
