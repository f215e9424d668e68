"""Offline measurement of bwpredd: not part of the daemon, not installed with it.

Run from the repository root (``make bench``, ``make soak``):

- ``python -m bench [--quick]``: the benchmark (:mod:`bench.cli`): every
  figure against a baseline measured in the same run; its sections in
  :mod:`bench.scenarios`, the load generators in :mod:`bench.load`, the bare
  gRPC floors in :mod:`bench.floor`, the report in :mod:`bench.report`,
  py-spy profiles in :mod:`bench.profile`;
- ``python -m bench.soak --minutes N``: mixed load with faults against a
  daemon, every acknowledged sample checked at the end (:mod:`bench.soak`);
- ``python bench/forecaster_speed.py``: the shipped forecaster's speed in a
  sandbox (one JSON line);
- :mod:`bench.harness`: a running daemon (in process or as a child process)
  and synthetic windows, shared with the tests.
"""
