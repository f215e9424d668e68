"""bench/forecaster_speed.py: the sandbox speed probe prints its JSON line."""

from __future__ import annotations

import json

import pytest

from bench.forecaster_speed import main


class TestForecasterSpeed:
    def test_prints_one_json_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A short run prints whether /proc/cpuinfo is visible and a median
        time per batch size, from the embedded model."""
        main(runs=((1, 3), (64, 2)))
        out = json.loads(capsys.readouterr().out)
        assert isinstance(out["cpuinfo_visible"], bool)
        assert out["forecaster_b1_median_us"] > 0 and out["forecaster_b64_median_us"] > 0
