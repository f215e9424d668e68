"""Time the shipped forecaster the way the daemon runs it; print one JSON line.

One job: compare onnxruntime's speed in two sandboxes, e.g. with and without
``/proc/cpuinfo`` (systemd's ``ProcSubset=pid`` hides it, and onnxruntime's
CPU detection then fails). It loads the embedded model with the daemon's own
session settings (:func:`bwpredd.modeldir.load_model`, 1 intra-op thread) and
reports the median time of one forecaster run at batch 1 (3,000 runs) and
batch 64 (300 runs), after a warm-up. Run it alternately in the two
sandboxes, several times each, and compare medians; one run proves nothing
on a shared machine.

Usage: ``python bench/forecaster_speed.py`` (it needs bwpredd, not the rest
of the repository). Under systemd, e.g.::

    systemd-run --wait --pipe -q -p DynamicUser=yes -p ProtectProc=invisible \\
      -p ProcSubset=pid /opt/bwpredd/venv/bin/python bench/forecaster_speed.py
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

from bwpredd.modeldir import DEFAULT_MODEL_DIR, load_model, smoke_windows

RUNS = ((1, 3000), (64, 300))  # (batch, timed runs)


def main(runs: Sequence[tuple[int, int]] = RUNS) -> None:
    """Print ``{"cpuinfo_visible": ..., "forecaster_b<batch>_median_us": ...}``.

    Args:
        runs: ``(batch, timed runs)`` pairs.
    """
    model = load_model(DEFAULT_MODEL_DIR, 1)
    out: dict[str, object] = {"cpuinfo_visible": os.path.exists("/proc/cpuinfo")}
    for batch, n in runs:
        windows = smoke_windows(batch)
        for _ in range(200):
            model.run_forecaster(windows)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model.run_forecaster(windows)
            times.append(time.perf_counter() - start)
        out[f"forecaster_b{batch}_median_us"] = round(float(np.median(times)) * 1e6, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
