"""Where the trainer finds its traces, and a quick look at them.

Parsing is :mod:`bwpredd.traces` (shared with ``bwpredctl replay``); this
module only knows the development layout: ``$BWPRED_TRACES``, else
``../shared/traces`` next to the repository.
``python -m trainer.data.traces [DIR]`` prints what a directory holds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from bwpredd.traces import load_traces, summarize

__all__ = ["default_traces_dir"]


def default_traces_dir() -> Path:
    """Return ``$BWPRED_TRACES`` if set, else ``../shared/traces`` next to the repo."""
    env = os.environ.get("BWPRED_TRACES")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    return (repo_root.parent / "shared" / "traces").resolve()


def _main(argv: list[str]) -> None:
    start = time.perf_counter()
    res = load_traces(argv[0] if argv else default_traces_dir())
    elapsed = time.perf_counter() - start
    print(json.dumps(summarize(res), indent=1))
    print(f"unknown={len(res.unknown)} skipped={len(res.skipped)} load_s={elapsed:.2f}")
    for k, v in res.skipped.items():
        print(f"  skipped {k}: {v}")
    for p in res.unknown:
        print(f"  unknown {p}")


if __name__ == "__main__":
    _main(sys.argv[1:])
