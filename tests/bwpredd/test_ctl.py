"""bwpredctl against a real daemon."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bwpredd import ctl
from tests.helpers import running_server

HEADER = "peer_id,bandwidth_mbps\n"
# (name, file bytes, what the one-line error says after "FILE: ")
BAD_CSV: list[tuple[str, bytes, str]] = [
    (
        "field-over-128k",
        f"{HEADER}a,{'9' * 140_000}\n".encode(),
        "line 2: malformed CSV: field larger",
    ),
    (
        "unterminated-quote",
        f'{HEADER}a,1\n"b,2\n'.encode(),
        "line 3: malformed CSV: unexpected end",
    ),
    ("short-row", b"peer_id,bandwidth_mbps,latency_ms\na,1,2\nb\n", "line 3: fewer cells"),
    ("long-row", f"{HEADER}a,1\nb,2,3\n".encode(), "line 3: more cells"),
    ("not-utf8", f"{HEADER}a,1\n".encode() + b"b,\xff\n", "line 3: not UTF-8 text"),
    ("not-a-number", f"{HEADER}a,1\n\na,x\n".encode(), "line 4: could not convert"),
    ("empty", b"", "line 1: CSV header lacks bandwidth_mbps, peer_id"),
]


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

    @pytest.mark.parametrize(("name", "data", "said"), BAD_CSV, ids=[c[0] for c in BAD_CSV])
    def test_bad_csv_one_line_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, data: bytes, said: str
    ) -> None:
        """A malformed CSV file is refused before anything is sent: exit 2 and
        one line naming the file and the line, no traceback."""
        path = tmp_path / f"{name}.csv"
        path.write_bytes(data)
        with running_server(tmp_path) as (server, client):
            assert ctl.main(["--target", server.address, "push", str(path)]) == 2
            assert client.peers() == []
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert err.startswith(f"bwpredctl: {path}: {said}"), err

    def test_bom_accepted(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A UTF-8 byte order mark before the header (as spreadsheets write
        it) is ignored, in a file and on stdin."""
        path = tmp_path / "bom.csv"
        path.write_bytes(b"\xef\xbb\xbfpeer_id,bandwidth_mbps\nbom-a,1\nbom-a,2\n")
        with running_server(tmp_path) as (server, client):
            assert ctl.main(["--target", server.address, "push", str(path)]) == 0
            monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(path.read_bytes())))
            assert ctl.main(["--target", server.address, "push", "-"]) == 0
            assert client.peer("bom-a").sample_count == 4
        assert capsys.readouterr().out.count("accepted 2, rejected 0") == 2

    def test_csv_errors_name_the_line(self) -> None:
        """A bad cell is reported with its line number."""
        with pytest.raises(ValueError, match="line 3"):
            list(ctl.read_samples(io.StringIO("peer_id,bandwidth_mbps\na,1\na,x\n")))
        with pytest.raises(ValueError, match="bandwidth_mbps"):
            list(ctl.read_samples(io.StringIO("peer_id\na\n")))
