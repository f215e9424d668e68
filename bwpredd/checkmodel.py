"""Validate a model directory offline (``bwpredd check-model DIR``).

The checks are :func:`bwpredd.modeldir.load_model`'s, the very ones the daemon
runs before it serves a model: the manifest schema; each file's sha256; the
state layout; both graphs load in onnxruntime from the bytes that were
verified; their input and output names, dtypes and shapes match the manifest;
and a smoke inference over four orders of magnitude of bandwidth. Imports
only onnxruntime, numpy, the standard library and ``bwpredd``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bwpredd.errors import ModelError
from bwpredd.modeldir import load_model

__all__ = ["EXIT_INVALID", "EXIT_OK", "CheckResult", "check_model_dir", "main"]

EXIT_OK = 0
EXIT_INVALID = 1


@dataclass
class CheckResult:
    """The outcome of :func:`check_model_dir`: ok, or the first reason it is not."""

    ok: bool
    path: Path
    reason: str = ""
    version: str = ""
    files: dict[str, int] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a terminal: OK with version, files and timings, or the reason."""
        if not self.ok:
            return f"FAIL {self.path}: {self.reason}"
        files = ", ".join(f"{name} {size / 1024:.0f} KiB" for name, size in self.files.items())
        times = ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings_ms.items())
        return f"OK {self.path}: version {self.version}; {files}; {times}"


def check_model_dir(path: Path) -> CheckResult:
    """Validate a model directory without torch.

    Args:
        path: the model directory (holding ``manifest.json``).

    Returns:
        ``ok=True`` with the version, file sizes and load/inference timings,
        or ``ok=False`` with the first failure as ``reason``.
    """
    path = Path(path)
    try:
        model = load_model(path)
    except ModelError as exc:
        return CheckResult(ok=False, path=path, reason=exc.reason)
    return CheckResult(
        ok=True,
        path=path,
        version=model.version,
        files=dict(model.sizes),
        timings_ms=dict(model.timings_ms),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``bwpredd check-model DIR``: print one line, return 0 if the directory is good.

    Args:
        argv: the arguments after the subcommand (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="bwpredd check-model",
        description="Validate a model directory offline: manifest, sha256, ONNX I/O, smoke run.",
    )
    parser.add_argument("model_dir", type=Path, metavar="DIR", help="the model directory")
    args = parser.parse_args(argv)
    result = check_model_dir(args.model_dir)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return EXIT_OK if result.ok else EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
