"""bwpredctl against a real daemon."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bwpredd import ctl
from tests.helpers import running_server


class TestCtl:
    """The client CLI."""

    def test_push_forecast_allocate_peers(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """push from a CSV file, then forecast, allocate, peers and peer print the answers."""
        csv_file = tmp_path / "s.csv"
        rows = ["peer_id,bandwidth_mbps,latency_ms,packet_loss,reliability"]
        rows += [f"node-b,{900 + i},0.4,,1" for i in range(12)]
        csv_file.write_text("\n".join(rows) + "\n")
        with running_server(tmp_path) as (server, _):
            t = ["--target", server.address]
            assert ctl.main([*t, "health"]) == 0
            assert ctl.main([*t, "push", str(csv_file)]) == 0
            assert "accepted 12, rejected 0" in capsys.readouterr().out
            assert ctl.main([*t, "forecast", "node-b"]) == 0
            assert "MODEL" in capsys.readouterr().out
            assert ctl.main([*t, "--json", "allocate", "node-b"]) == 0
            alloc = json.loads(capsys.readouterr().out)
            assert alloc["allocation_percent"] == (alloc.get("action", 0) + 1) * 10
            assert ctl.main([*t, "peers"]) == 0
            assert capsys.readouterr().out.split("\t")[0] == "node-b"
            assert ctl.main([*t, "--json", "peer", "node-b"]) == 0
            assert json.loads(capsys.readouterr().out)["sample_count"] == "12"

    def test_push_stdin_with_rejections(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """push - reads stdin; a bad row is reported with its reason and exit 1."""
        text = "peer_id,bandwidth_mbps\na,1\na,-3\n"
        monkeypatch.setattr("sys.stdin", io.StringIO(text))
        with running_server(tmp_path) as (server, _):
            assert ctl.main(["--target", server.address, "push", "-"]) == 1
            captured = capsys.readouterr()
            assert "accepted 1, rejected 1" in captured.out
            assert "bandwidth_mbps: must be >= 0" in captured.err

    def test_unknown_peer_exit_code(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An RPC error prints the status and exits 2."""
        with running_server(tmp_path) as (server, _):
            assert ctl.main(["--target", server.address, "forecast", "nobody"]) == 2
            assert "NOT_FOUND" in capsys.readouterr().err

    def test_csv_errors_name_the_line(self) -> None:
        """A bad cell is reported with its line number."""
        with pytest.raises(ValueError, match="line 3"):
            list(ctl.read_samples(io.StringIO("peer_id,bandwidth_mbps\na,1\na,x\n")))
        with pytest.raises(ValueError, match="bandwidth_mbps"):
            list(ctl.read_samples(io.StringIO("peer_id\na\n")))
