"""``bwpredctl``: a command-line client of the daemon on the generated stubs.

Commands: ``health``, ``push FILE|-``, ``forecast [--horizon SECONDS] PEER...``, ``allocate
PEER...``, ``peers``, ``peer PEER``, ``advise PEER BYTES``, ``replay TRACE...``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import grpc
from google.protobuf.json_format import MessageToDict

from bwpredd.client import Client, channel_for, pb
from bwpredd.config import default_listen
from bwpredd.schema import OPTIONAL, PUSH_CSV_REQUIRED, REQUIRED

__all__ = ["main", "read_samples"]

PUSH_BATCH = 1000


def read_samples(stream: TextIO) -> Iterator[pb.Sample]:
    """Samples from CSV with a header naming ``peer_id`` and the required
    features (``bandwidth_mbps``), optionally the other features of
    :mod:`bwpredd.schema` (``latency_ms``, ``packet_loss``, ``reliability``)
    and ``timestamp`` (unix seconds); empty cells are "not given". A UTF-8
    byte order mark before the header is ignored.

    Args:
        stream: the CSV text.

    Raises:
        ValueError: a missing column, a malformed CSV record (unterminated
            quote, a field over the csv module's limit, a row longer or
            shorter than the header) or a cell that is not a number, naming
            the line.
    """
    reader = csv.DictReader(stream, strict=True)
    try:
        header = reader.fieldnames
    except (csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"line {reader.reader.line_num or 1}: {_csv_reason(exc)}") from None
    if header:
        # A byte order mark read as text (stdin, or a file opened as utf-8).
        reader.fieldnames = [header[0].removeprefix("\ufeff"), *header[1:]]
    columns = set(reader.fieldnames or ())
    missing = set(PUSH_CSV_REQUIRED) - columns
    if missing:
        raise ValueError(f"line 1: CSV header lacks {', '.join(sorted(missing))}")
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            # The DictReader's own line_num only moves after a good record.
            raise ValueError(f"line {reader.reader.line_num}: {_csv_reason(exc)}") from None
        line = reader.line_num
        if None in row:
            raise ValueError(f"line {line}: more cells than the header's {len(columns)} columns")
        if None in row.values():
            raise ValueError(f"line {line}: fewer cells than the header's {len(columns)} columns")
        try:
            fields: dict[str, Any] = {"peer_id": row["peer_id"]}
            for name in REQUIRED:
                fields[name] = float(row[name])
            for name in OPTIONAL:
                if row.get(name):
                    fields[name] = float(row[name])
            sample = pb.Sample(**fields)
            if row.get("timestamp"):
                t = float(row["timestamp"])
                sample.timestamp.seconds = math.floor(t)
                # Rounding can reach 1e9 just below a whole second.
                sample.timestamp.nanos = min(int((t - math.floor(t)) * 1e9), 999_999_999)
        except (ValueError, OverflowError) as exc:
            raise ValueError(f"line {line}: {exc}") from None
        yield sample


def _csv_reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):  # decoded by chunks: the line is approximate
        return f"not UTF-8 text near here ({exc.reason})"
    return f"malformed CSV: {exc}"


def _csv_text(data: bytes) -> str:
    """CSV bytes as text, without a UTF-8 byte order mark.

    Raises:
        ValueError: the bytes are not UTF-8, naming the line.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"line {line}: not UTF-8 text ({exc.reason})") from None


def _show(message: Any, as_json: bool) -> None:
    data = MessageToDict(message, preserving_proto_field_name=True)
    if as_json:
        print(json.dumps(data, sort_keys=True))
    else:
        print(json.dumps(data, indent=2, sort_keys=True))


def _push(client: Client, args: argparse.Namespace) -> int:
    stdin = args.file == "-"
    if stdin:
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    else:
        with open(args.file, "rb") as fh:
            raw = fh.read()
    accepted = rejected = 0
    try:
        text = _csv_text(raw) if isinstance(raw, bytes) else raw
        samples = list(read_samples(io.StringIO(text, newline="")))
    except ValueError as exc:
        raise ValueError(f"{'<stdin>' if stdin else args.file}: {exc}") from None
    offset = 0
    for start in range(0, len(samples), PUSH_BATCH):
        resp = client.push(samples[start : start + PUSH_BATCH])
        accepted += resp.accepted
        rejected += resp.rejected
        for r in resp.rejections:
            print(f"rejected sample {offset + r.index}: {r.reason}", file=sys.stderr)
        offset += PUSH_BATCH
    print(f"accepted {accepted}, rejected {rejected}")
    return 0 if rejected == 0 else 1


def _forecast(client: Client, args: argparse.Namespace) -> int:
    for fc in client.forecast(args.peers, args.horizon):
        if args.json:
            _show(fc, True)
        else:
            source = pb.ForecastSource.Name(fc.source).removeprefix("FORECAST_SOURCE_")
            over = f"mean over {fc.horizon_seconds:g} s: " if fc.horizon_seconds else ""
            print(
                f"{fc.peer_id}: {over}{fc.bandwidth_mbps:.3f} Mbit/s "
                f"[{fc.low_mbps:.3f}, {fc.high_mbps:.3f}] {source} "
                f"({fc.samples_in_window} samples, model {fc.model_version or '-'})"
            )
    return 0


def _allocate(client: Client, args: argparse.Namespace) -> int:
    for a in client.allocate(args.peers):
        if args.json:
            _show(a, True)
        else:
            source = pb.ForecastSource.Name(a.source).removeprefix("FORECAST_SOURCE_")
            print(
                f"{a.peer_id}: action {a.action} = {a.allocation_percent}% of "
                f"{a.reference_capacity_mbps:.3f} Mbit/s = {a.allocated_mbps:.3f} Mbit/s {source}"
            )
    return 0


def _peers(client: Client, args: argparse.Namespace) -> int:
    for p in client.peers():
        if args.json:
            _show(p, True)
        else:
            print(f"{p.peer_id}\t{p.samples_in_window}\t{p.sample_count}")
    return 0


def _peer(client: Client, args: argparse.Namespace) -> int:
    _show(client.peer(args.peer), args.json)
    return 0


def _health(client: Client, args: argparse.Namespace) -> int:
    status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def _advise(client: Client, args: argparse.Namespace) -> int:
    kind = getattr(pb, f"DATA_KIND_{args.data_kind.upper()}")
    resp = client.stub.Advise(
        pb.AdviseRequest(peer_id=args.peer, payload_bytes=args.bytes, data_kind=kind),
        timeout=client.timeout,
    )
    _show(resp.advice, args.json)
    return 0


def _replay(client: Client, args: argparse.Namespace) -> int:
    from pathlib import Path

    from bwpredd.replay import replay

    report = replay(
        client,
        [Path(p) for p in args.traces],
        speedup=args.speedup,
        progress=not args.no_progress,
        plot=Path(args.plot) if args.plot else None,
    )
    print(report.table())
    if args.json:
        print(json.dumps(report.to_json(), sort_keys=True))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bwpredctl", description=__doc__)
    parser.add_argument(
        "--target", default=None, help=f"daemon address (default: {default_listen()})"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--ca", help="CA certificate (PEM) for TLS")
    parser.add_argument("--cert", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--key", help="client key (PEM) for mutual TLS")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("health", help="health status (exit 1 unless SERVING)")
    p.add_argument("service", nargs="?", default="", help="e.g. bwpredd.model")
    p.set_defaults(func=_health)
    p = sub.add_parser("push", help="push samples from CSV (FILE or - for stdin)")
    p.add_argument("file")
    p.set_defaults(func=_push)
    p = sub.add_parser("forecast", help="forecast peers")
    p.add_argument("peers", nargs="+")
    p.add_argument(
        "--horizon",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the mean bandwidth over the next SECONDS instead of the next step",
    )
    p.set_defaults(func=_forecast)
    p = sub.add_parser("allocate", help="allocation levels of peers")
    p.add_argument("peers", nargs="+")
    p.set_defaults(func=_allocate)
    p = sub.add_parser("peers", help="list peers: id, samples in window, samples seen")
    p.set_defaults(func=_peers)
    p = sub.add_parser("peer", help="one peer's window and live accuracy")
    p.add_argument("peer")
    p.set_defaults(func=_peer)
    p = sub.add_parser("advise", help="transfer advice for BYTES to PEER")
    p.add_argument("peer")
    p.add_argument("bytes", type=int)
    p.add_argument(
        "--data-kind", default="unspecified", choices=["unspecified", "memory", "text", "random"]
    )
    p.set_defaults(func=_advise)
    p = sub.add_parser("replay", help="stream trace files in and score live forecasts")
    p.add_argument("traces", nargs="+")
    p.add_argument("--speedup", type=float, default=None, help="replay at N x real time")
    p.add_argument("--plot", help="write forecast vs actual to this PNG")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bwpredctl`` console script.

    Args:
        argv: arguments (``sys.argv[1:]`` when None).
    """
    args = _parser().parse_args(argv)
    target = args.target or default_listen()
    client = Client(
        channel_for(target, ca=args.ca, cert=args.cert, key=args.key), timeout=args.timeout
    )
    try:
        return int(args.func(client, args))
    except grpc.RpcError as exc:
        print(f"bwpredctl: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"bwpredctl: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
