"""Seeded traces of a datacenter fabric link: the profile ``make mesh-demo``
replays into its daemons, one the shipped models never trained on.

One job: generate ``[latency_ms, bandwidth_mbps, packet_loss, reliability]``
series for one link between two nodes of a datacenter fabric, as a bwpredd
on one of them would measure it (the throughput its own transfers get), from
a documented process. One step = 1 s; per link (seeded) a line rate ``R``
(10, 25, 40 or 100 Gbit/s), a sync period ``P`` (5 to 8 s) and phase::

    k_t   elephant flows sharing the link, a birth-death chain:
          k_t = k_{t-1} - Binomial(k_{t-1}, p_end) + Poisson(lambda_new),
          p_end = 0.1, lambda_new = 0.15 (mean 1.5 flows), k_0 from its mean.
    j_t   a periodic job (storage replication, checkpoint sync) on the link:
          1 for 2 steps out of every P, else 0; it competes as 2 flows.
    bw_t  = eff * R / (1 + k_t + 2 j_t) * exp(0.02 eps_t),  eff = 0.94,

the fair share of the link the daemon's own transfer gets, with 2%
measurement noise (``eps`` i.i.d. N(0, 1)). The other features follow the
competition ``c_t = k_t + 2 j_t``::

    latency_t = base_lat * (1 + 0.4 c_t) * exp(0.05 xi_t),  base_lat ~ U(0.05, 0.3) ms
    loss_t    = min(1e-5 + 2e-5 c_t, 1),  reliability_t = 1 - loss_t

What a forecaster can learn here and not from the public traces: the job
repeats within the 10-step window, so the window shows when the next
slowdown is due. A model trained elsewhere follows the last value across
each edge; one trained in situ anticipates it.
"""

from __future__ import annotations

import numpy as np

from bwpredd.schema import BW, LAT, LOSS, REL, WIDTH

__all__ = ["LINE_RATES_GBPS", "fabric_link"]

LINE_RATES_GBPS = (10.0, 25.0, 40.0, 100.0)
P_END = 0.1
LAMBDA_NEW = 0.15
JOB_STEPS = 2
JOB_WEIGHT = 2.0
EFFICIENCY = 0.94
NOISE = 0.02


def fabric_link(seed: int, n_steps: int) -> np.ndarray:
    """One link's ``float32 [n_steps, WIDTH]`` series (module docstring)."""
    rng = np.random.default_rng([seed, 18])
    rate = float(rng.choice(LINE_RATES_GBPS)) * 1000.0
    period = int(rng.integers(5, 9))
    phase = int(rng.integers(0, period))
    base_lat = float(rng.uniform(0.05, 0.3))
    k = np.zeros(n_steps)
    flows = round(LAMBDA_NEW / P_END)
    for t in range(n_steps):
        flows = flows - int(rng.binomial(flows, P_END)) + int(rng.poisson(LAMBDA_NEW))
        k[t] = flows
    job = (((np.arange(n_steps) + phase) % period) < JOB_STEPS).astype(np.float64)
    competing = k + JOB_WEIGHT * job
    out = np.zeros((n_steps, WIDTH), dtype=np.float32)
    out[:, BW] = EFFICIENCY * rate / (1.0 + competing) * np.exp(NOISE * rng.normal(size=n_steps))
    out[:, LAT] = base_lat * (1.0 + 0.4 * competing) * np.exp(0.05 * rng.normal(size=n_steps))
    out[:, LOSS] = np.minimum(1e-5 + 2e-5 * competing, 1.0)
    out[:, REL] = 1.0 - out[:, LOSS]
    return out
