"""Measure lz4 and zstd on this machine and write ``bwpredd/data/codecs.json``.

One job: the compression table that :mod:`bwpredd.advise` reads. For each
data kind (VM-memory-like pages, text, random bytes) and each codec (lz4 frame
at its default level; zstd levels 1, 3, 9 and 19) it records the compressed /
original size ratio and the single-thread compress and decompress speeds in
MB/s (10^6 bytes per second of *original* data), best of a few runs in
thread CPU time (so other load on a shared machine does not skew it). The
daemon never imports zstandard or lz4: they are dev-only dependencies, and the
table is the only thing that crosses over.

The data kinds (each ``--size`` bytes, default 8 MiB, seeded):

* ``memory``: 4 KiB pages drawn as a guest's RAM looks to a live migration:
  35% zero pages, 15% duplicates of an earlier page (shared libraries, page
  cache copies), 20% text pages (slices of the Python standard library's
  source: page cache of files), 15% structured pages (little-endian int64
  arrays of small counters and pointer-like values sharing their high bytes:
  heap data), 15% random pages (encrypted or already compressed data).
* ``text``: the Python standard library's ``.py`` sources, concatenated in
  sorted path order (logs and configuration compress alike).
* ``random``: uniformly random bytes (already compressed or encrypted data).

Usage: ``python -m bench.measure_codecs [--out PATH] [--size BYTES] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import lz4
import lz4.frame
import numpy as np
import zstandard

PAGE = 4096
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "bwpredd" / "data" / "codecs.json"
# (codec, level); lz4 level 0 is the lz4 frame default (fast mode).
CODECS: tuple[tuple[str, int], ...] = (
    ("lz4", 0),
    ("zstd", 1),
    ("zstd", 3),
    ("zstd", 9),
    ("zstd", 19),
)
MEMORY_MIX = {"zero": 0.35, "duplicate": 0.15, "text": 0.20, "structured": 0.15, "random": 0.15}
DESCRIPTIONS = {
    "memory": (
        "4 KiB pages, shuffled: 35% zero, 15% duplicates of earlier pages, "
        "20% text (Python stdlib source), 15% structured (int64 counters and "
        "pointer-like values), 15% random"
    ),
    "text": "Python standard library .py sources, concatenated",
    "random": "uniformly random bytes (compressed or encrypted data)",
}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else platform's guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def stdlib_text(size: int) -> bytes:
    """At least ``size`` bytes of the standard library's source, deterministic."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            out += path.read_bytes()
        except OSError:
            continue
        if len(out) >= size:
            break
    if len(out) < size:
        out = out * (size // max(len(out), 1) + 1)
    return bytes(out[:size])


def memory_pages(size: int, rng: np.random.Generator, text: bytes) -> bytes:
    """VM-memory-like pages in the :data:`MEMORY_MIX` proportions."""
    n = size // PAGE
    kinds = rng.choice(list(MEMORY_MIX), size=n, p=list(MEMORY_MIX.values()))
    pages: list[bytes] = []
    for kind in kinds:
        if kind == "zero":
            page = bytes(PAGE)
        elif kind == "duplicate" and pages:
            page = pages[int(rng.integers(len(pages)))]
        elif kind in {"text", "duplicate"}:
            start = int(rng.integers(0, len(text) - PAGE))
            page = text[start : start + PAGE]
        elif kind == "structured":
            words = PAGE // 8
            base = np.int64(0x7F00_0000_0000) + rng.integers(0, 1 << 20) * 4096
            pointers = base + rng.integers(0, 1 << 16, size=words) * 16
            counters = rng.integers(0, 256, size=words)
            page = np.where(rng.random(words) < 0.5, pointers, counters).astype("<i8").tobytes()
        else:
            page = rng.bytes(PAGE)
        pages.append(page)
    return b"".join(pages)


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` runs of ``fn``, in this thread's CPU time.

    CPU time, not wall time, because the build machines are shared: other
    processes preempting this one would otherwise halve the speeds at random.
    """
    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def measure(codec: str, level: int, data: bytes, repeat: int) -> dict[str, float]:
    """Ratio and single-thread speeds of one codec on one buffer."""
    if codec == "lz4":

        def compress() -> bytes:
            return bytes(lz4.frame.compress(data))

        packed = compress()

        def decompress() -> bytes:
            return bytes(lz4.frame.decompress(packed))
    else:
        cctx = zstandard.ZstdCompressor(level=level, threads=0)
        dctx = zstandard.ZstdDecompressor()

        def compress() -> bytes:
            return bytes(cctx.compress(data))

        packed = compress()

        def decompress() -> bytes:
            return bytes(dctx.decompress(packed))

    if decompress() != data:
        raise RuntimeError(f"{codec} {level}: round trip failed")
    # Level 19 takes seconds per run and never wins: one run is enough.
    runs = 1 if level >= 19 else repeat
    c_s = best_seconds(compress, runs)
    d_s = best_seconds(decompress, repeat)
    return {
        "ratio": round(len(packed) / len(data), 5),
        "compress_mb_s": round(len(data) / c_s / 1e6, 1),
        "decompress_mb_s": round(len(data) / d_s / 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure every codec on every data kind and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--size", type=int, default=8 * 1024 * 1024)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(20240601)
    text = stdlib_text(args.size)
    data = {
        "memory": memory_pages(args.size, rng, text),
        "text": text,
        "random": rng.bytes(args.size),
    }
    codecs = []
    for codec, level in CODECS:
        row: dict[str, object] = {"codec": codec, "level": level, "kinds": {}}
        for kind, buf in data.items():
            m = measure(codec, level, buf, args.repeat)
            row["kinds"][kind] = m  # type: ignore[index]
            print(
                f"{codec:>4} {level:>2} {kind:>6}: ratio {m['ratio']:.3f} "
                f"compress {m['compress_mb_s']:8.1f} MB/s "
                f"decompress {m['decompress_mb_s']:8.1f} MB/s",
                file=sys.stderr,
            )
        codecs.append(row)
    table = {
        "format": 1,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "zstandard": zstandard.__version__,
            "lz4": lz4.__version__,
        },
        "method": (
            "single thread, one-shot compress/decompress of the whole buffer, "
            "best of --repeat runs (one run for zstd 19) in thread CPU time; MB/s = 1e6 bytes of "
            "original data per second; ratio = compressed / original"
        ),
        "sample_bytes": args.size,
        "kinds": DESCRIPTIONS,
        "codecs": codecs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
