"""The live-accuracy guardrail through a real server."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bench.harness import synthetic_windows
from bwpredd.client import Client, pb
from bwpredd.state import STATE_LAYOUT
from export import export_model_dir
from tests.bwpredd.test_reload import reload
from tests.conftest_models import make_model_dir
from tests.helpers import running_server, sample
from trainer.models.qnet import QNetConfig, QNetwork

MODEL = pb.FORECAST_SOURCE_MODEL
FALLBACK = pb.FORECAST_SOURCE_BASELINE_FALLBACK


class LastValue(nn.Module):
    """A forecaster that says the next step equals the last (interval +-10%)."""

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last = window[:, -1, 1:2]
        return last, last * 0.9, last * 1.1


def publish_last_value_model(dest: Path, tmp_path: Path) -> None:
    """Export LastValue (with an untrained allocator) over ``dest``."""
    export_model_dir(
        LastValue(),
        QNetwork(QNetConfig(state_size=len(STATE_LAYOUT))),
        dest,
        windows=synthetic_windows(64, 0),
        windows_source="synthetic",
        version="last-value",
        evaluation={},
        training_data={},
        provenance={"test": "guardrail"},
        force=True,
        timing=False,
        log=lambda _line: None,
    )


def step(client: Client, peer: str, value: float) -> pb.PeerForecast:
    """Forecast the peer, then push the value that 'arrives'."""
    (fc,) = client.forecast([peer])
    assert client.push([sample(peer, value, latency_ms=10.0)]).accepted == 1
    return fc


class TestGuardrail:
    """A model that loses on a peer's live data gives way to the baseline."""

    def test_switches_to_fallback_and_back(self, tmp_path: Path) -> None:
        """A deliberately wrong model (forecasts x5) is replaced by the baseline
        after K scored steps; a correct model on reload wins it back."""
        bad = make_model_dir(tmp_path / "model", version="wrong", forecast_scale=5.0)
        with running_server(
            tmp_path, model_dir=str(bad), guardrail_steps=5, guardrail_margin=0.1
        ) as (server, client):
            client.push([sample("p", 100.0, latency_ms=10.0) for _ in range(10)])
            sources = [step(client, "p", 100.0).source for i in range(8)]
            assert sources[0] == MODEL
            assert sources[-1] == FALLBACK
            peer = client.peer("p")
            acc = peer.live_accuracy
            assert acc.guardrail_active and acc.scored_steps == 5
            assert acc.model_mae_mbps > acc.baseline_mae_mbps
            summary = server.core.scores.summary() if server.core else {}
            assert summary["peers_in_fallback"] == 1
            # A last-value model on a ramp of +10 per step errs 10 while the
            # EWMA (alpha 0.5) lags and errs about 20: the model wins again.
            publish_last_value_model(bad, tmp_path)
            assert reload(server)
            last = [step(client, "p", 110.0 + 10 * i).source for i in range(12)]
            assert last[-1] == MODEL
            assert not client.peer("p").live_accuracy.guardrail_active

    def test_horizon_answers_counted_as_served(self, tmp_path: Path) -> None:
        """A peer the guardrail gave to the baseline is still answered by the
        horizon model for a horizon: bwpredd_forecasts_total counts the
        source the reply says (MODEL), not the next step's fallback."""
        bad = make_model_dir(tmp_path / "model", version="wrong", forecast_scale=5.0, horizon=True)
        with running_server(
            tmp_path, model_dir=str(bad), guardrail_steps=5, guardrail_margin=0.1
        ) as (server, client):
            client.push([sample("p", 100.0, latency_ms=10.0) for _ in range(10)])
            for _ in range(8):
                step(client, "p", 100.0)
            assert client.peer("p").live_accuracy.guardrail_active

            def served(source: str) -> float:
                value = server.registry.get_sample_value(  # type: ignore[attr-defined]
                    "bwpredd_forecasts_total", {"source": source}
                )
                return value or 0.0

            model, fallback = served("model"), served("baseline_fallback")
            (fc,) = client.stub.Forecast(
                pb.ForecastRequest(peer_ids=["p"], horizon_seconds=30.0), timeout=10
            ).forecasts
            assert fc.source == MODEL and fc.horizon_seconds == 30.0
            assert served("model") == model + 1
            assert served("baseline_fallback") == fallback

    def test_disabled(self, tmp_path: Path) -> None:
        """With guardrail = false the losing model keeps serving, still scored."""
        bad = make_model_dir(tmp_path / "model", version="wrong", forecast_scale=5.0)
        with running_server(tmp_path, model_dir=str(bad), guardrail=False, guardrail_steps=3) as (
            _,
            client,
        ):
            client.push([sample("p", 100.0) for _ in range(10)])
            sources = [step(client, "p", 100.0).source for i in range(6)]
            assert set(sources) == {MODEL}
            assert client.peer("p").live_accuracy.scored_steps == 3
