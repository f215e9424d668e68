"""Forecast with horizon_seconds, and Advise / RankPeers transfer times, through
a real server (issue 16)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from bwpredd import ctl
from bwpredd.client import Client, pb
from tests.conftest_models import make_model_dir
from tests.helpers import running_server, sample


def fill(client: Client, peer: str, bw: float, n: int = 10, step_s: float = 1.0) -> None:
    """``n`` samples of ``peer`` at about ``bw``, ``step_s`` apart, ending now."""
    now = time.time()
    samples = []
    for i in range(n):
        t = now - (n - 1 - i) * step_s
        ts = Timestamp(seconds=int(t), nanos=int((t % 1) * 1e9))
        samples.append(sample(peer, bw * (1 + 0.01 * (i % 3)), latency_ms=20.0, timestamp=ts))
    assert client.push(samples).accepted == n


def forecast(client: Client, peers: list[str], horizon: float) -> list[pb.PeerForecast]:
    return client.forecast(peers, horizon_seconds=horizon)


def advise(client: Client, peer: str, size: int) -> pb.Advice:
    req = pb.AdviseRequest(peer_id=peer, payload_bytes=size, data_kind=pb.DATA_KIND_RANDOM)
    return client.stub.Advise(req, timeout=10).advice


@pytest.fixture(scope="module")
def old_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory without horizons, as export wrote them before."""
    return make_model_dir(tmp_path_factory.mktemp("old") / "m", version="test-old")


class TestForecastHorizon:
    """ForecastRequest.horizon_seconds."""

    def test_mean_over_horizon(self, tmp_path: Path) -> None:
        """A full window under the shipped model gets the mean over the horizon
        (MODEL, the horizon echoed, an interval around it); 0 is the next step."""
        with running_server(tmp_path) as (_, client):
            fill(client, "steady", 200.0)
            (next_step,) = forecast(client, ["steady"], 0.0)
            assert next_step.horizon_seconds == 0.0
            for h in (1.0, 30.0, 120.0, 3600.0):
                (fc,) = forecast(client, ["steady"], h)
                assert fc.horizon_seconds == h
                assert fc.source == pb.FORECAST_SOURCE_MODEL
                assert fc.low_mbps <= fc.bandwidth_mbps <= fc.high_mbps
                assert fc.bandwidth_mbps == pytest.approx(200.0, rel=0.2)
            (again,) = forecast(client, ["steady"], 0.0)
            assert again == next_step

    def test_cold_start_keeps_next_step(self, tmp_path: Path) -> None:
        """A peer with a window still filling gets its next-step answer, horizon 0."""
        with running_server(tmp_path) as (_, client):
            fill(client, "new", 50.0, n=3)
            (fc,) = forecast(client, ["new"], 60.0)
            (plain,) = forecast(client, ["new"], 0.0)
            assert fc.horizon_seconds == 0.0
            assert fc.source == pb.FORECAST_SOURCE_BASELINE_COLD_START
            assert fc.bandwidth_mbps == plain.bandwidth_mbps

    @pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, 86_401.0])
    def test_bad_horizon_invalid_argument(self, tmp_path: Path, bad: float) -> None:
        """A horizon that is not finite, negative or over a day is
        INVALID_ARGUMENT naming horizon_seconds; the daemon serves on."""
        with running_server(tmp_path) as (_, client):
            fill(client, "p", 10.0)
            with pytest.raises(grpc.RpcError) as err:
                forecast(client, ["p"], bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "horizon_seconds" in (err.value.details() or "")
            assert forecast(client, ["p"], 10.0)[0].horizon_seconds == 10.0

    def test_old_model_directory_serves_next_step(self, tmp_path: Path, old_dir: Path) -> None:
        """Without horizons in the model directory, a horizon request gets the
        next-step forecast (horizon 0), as before."""
        with running_server(tmp_path, model_dir=str(old_dir)) as (_, client):
            fill(client, "p", 80.0)
            (fc,) = forecast(client, ["p"], 60.0)
            (plain,) = forecast(client, ["p"], 0.0)
            assert fc.horizon_seconds == 0.0
            assert fc.bandwidth_mbps == plain.bandwidth_mbps
            assert fc.model_version == "test-old"


class TestAdviseTransfer:
    """Advise and RankPeers take their times from the horizon forecasts."""

    def test_advise_times_from_horizons(self, tmp_path: Path) -> None:
        """On a steady 100 Mbit/s link, 1 GB of random data (no codec) takes
        about RTT + 80 s, in an interval around it; a larger payload takes longer."""
        with running_server(tmp_path) as (_, client):
            fill(client, "p", 100.0)
            a = advise(client, "p", 10**9)
            assert a.compression.codec == pb.CODEC_NONE
            assert a.transfer_seconds == pytest.approx(0.02 + 80.0, rel=0.15)
            assert a.transfer_seconds_low < a.transfer_seconds < a.transfer_seconds_high
            assert advise(client, "p", 4 * 10**9).transfer_seconds > a.transfer_seconds

    def test_rank_by_horizon_time(self, tmp_path: Path) -> None:
        """RankPeers orders by the horizon-based times."""
        with running_server(tmp_path) as (_, client):
            fill(client, "slow", 20.0)
            fill(client, "fast", 2000.0)
            req = pb.RankPeersRequest(peer_ids=["slow", "fast"], payload_bytes=1 << 30)
            resp = client.stub.RankPeers(req, timeout=10)
            assert [a.forecast.peer_id for a in resp.advice] == ["fast", "slow"]
            assert resp.advice[0].transfer_seconds < resp.advice[1].transfer_seconds

    def test_old_model_directory_keeps_todays_rule(self, tmp_path: Path, old_dir: Path) -> None:
        """Without horizons, Advise is today's rule: RTT + payload / next-step
        forecast, the interval's ends giving the time's."""
        with running_server(tmp_path, model_dir=str(old_dir)) as (_, client):
            fill(client, "p", 100.0)
            a = advise(client, "p", 10**9)
            fc = a.forecast
            bits = 8e9 / 1e6
            assert a.transfer_seconds == pytest.approx(0.02 + bits / fc.bandwidth_mbps, rel=1e-5)
            assert a.transfer_seconds_low == pytest.approx(0.02 + bits / fc.high_mbps, rel=1e-5)
            assert a.transfer_seconds_high == pytest.approx(0.02 + bits / fc.low_mbps, rel=1e-5)


class TestCtlTransfer:
    """bwpredctl forecast --horizon and advise."""

    def test_forecast_horizon_and_advise(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--horizon prints the mean over the horizon; advise prints the times."""
        with running_server(tmp_path) as (server, client):
            fill(client, "node-b", 900.0)
            t = ["--target", server.address]
            assert ctl.main([*t, "forecast", "--horizon", "30", "node-b"]) == 0
            assert "node-b: mean over 30 s: " in capsys.readouterr().out
            assert ctl.main([*t, "advise", "node-b", str(1 << 30)]) == 0
            out = capsys.readouterr().out
            assert '"transfer_seconds":' in out and '"transfer_seconds_high":' in out
