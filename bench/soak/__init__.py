"""Soak: mixed load from several processes against a real daemon, with faults.

``python -m bench.soak --minutes 3`` (or ``make soak DURATION=3``) starts
``python -m bwpredd`` on a unix socket with a state directory and a copy of the
default model directory, then runs, until the time is up:

- *steady* workers (processes), each owning a set of peers: PushSamples and
  lock-step StreamSamples with a small share of deliberately bad samples, some
  streams cancelled mid-flight. Every good sample carries a unique increasing
  bandwidth per peer, and the worker remembers what was acked (accepted), what
  was refused, and what is uncertain (sent on a call that failed);
- a *fading* cohort fed only during the warm-up and then left idle, so idle
  expiry must forget it;
- a *churn* worker trickling new peer ids, and id floods on demand (LRU);
- a *reader* (Forecast, Allocate, GetPeer, ListPeers, Advise) and a *watcher*
  (WatchForecasts, cancelled and reopened now and then);
- a *checker* owning a few peers that it feeds, leaves idle past the expiry
  time and feeds again (the id floods evict some too): it checks every
  Forecast and Allocate answer against one computed afresh from the window
  GetPeer shows just before and after, and that a removed peer is NOT_FOUND;

and injects faults: clients killed with SIGKILL mid-stream, SIGHUP reloads, a
corrupt model pushed (one flipped byte) then reverted, id floods, and a restart
with SIGTERM (drain, snapshot, restore). At the end every verified peer's
window is compared with what its worker had acked; a peer may be missing only
if it was evicted, which the eviction counters (summed over daemon lifetimes)
must explain. Resident memory is sampled every second; its growth per hour is
the slope after warm-up over the longest daemon lifetime. A summary table is
printed and ``reports/soak.json`` and ``reports/soak.md`` are written.

Workers send their results as JSON over pipes. Loopback and unix sockets only.

The modules: :mod:`bench.soak.common` (the plan, small helpers),
:mod:`bench.soak.workers` (the client processes), :mod:`bench.soak.checker`
(answers against windows), :mod:`bench.soak.faults` (the daemon's lifetimes
and the faults), :mod:`bench.soak.verify` (acked samples against windows,
memory growth), :mod:`bench.soak.report` (the verdict and the tables),
:mod:`bench.soak.run` (the schedule, the run, the command line).
"""
