"""Seeded synthetic link traces for the origin design's two profiles.

One job: generate ``[latency_ms, bandwidth_mbps, packet_loss, reliability]``
series for a *datacenter* and an *internet* link from a documented temporal
process, together with the process's own one-step-ahead expectation of
bandwidth (the oracle that defines the noise floor of any forecaster).

The process (one step = 1 s; ``t = 0 .. T-1``; parameters per profile in
:data:`PARAMS`)::

    s_t   regime, a two-state Markov chain: 0 = normal, 1 = congested;
          P(0 -> 1) = p_enter, P(1 -> 0) = p_exit; s_0 from its stationary law
          p_enter / (p_enter + p_exit).
    a_t   AR(1) in log space: a_t = phi * a_{t-1} + sigma * eps_t, eps_t ~ N(0,1);
          a_0 ~ N(0, sigma_a^2), sigma_a = sigma / sqrt(1 - phi^2) (stationary).
    e_t   i.i.d. events: -dip with prob. p_dip, +burst with prob. p_burst, else 0.
    D_t   diurnal drift: amp * sin(2 pi t / period + theta), theta ~ U(0, 2 pi) per trace
          (a "day" is compressed to ``period`` steps so a trace sees it move).
    bw_t  = clip(base * exp(D_t + offset * s_t + a_t + e_t), bw_lo, bw_hi)

Congestion is shared by the other features through the shortfall
``q_t = max(0, -(offset * s_t + a_t + e_t))`` (log bandwidth below its drifted
base), so latency and loss rise when bandwidth dips::

    l_t        = rho_l * l_{t-1} + sd_l * sqrt(1 - rho_l^2) * xi_t, l_0 ~ N(0, sd_l^2)
    latency_t  = clip(lat_base * exp(lat_gain * q_t + l_t), lat_lo, lat_hi)
    loss_t     = clip(loss_base * exp(0.5 * zeta_t) + loss_gain * q_t, 0, loss_hi)
    rel_t      = clip(rel_base - rel_gain * q_t - rel_sd * |omega_t|, rel_lo, rel_hi)

with ``xi, zeta, omega`` i.i.d. N(0, 1), independent of everything else.

The oracle ``oracle[t] = E[bw_t | s_{t-1}, a_{t-1}]`` (the full state after
step ``t-1``; ``D_t`` is deterministic given theta, which the oracle knows) is
exact: a sum over the next regime and the event of the closed-form mean of a
clipped log-normal. ``oracle[0]`` is the same expectation under the stationary
law of ``(s_0, a_0)``. No forecaster that sees only the past can beat it in
mean squared error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from bwpredd.schema import FEATURES, stack
from bwpredd.traces import Trace

__all__ = ["PARAMS", "PROFILES", "ProfileParams", "generate", "synthetic_traces"]

PROFILES = ("datacenter", "internet")


@dataclass(frozen=True)
class ProfileParams:
    """The constants of one profile's process (see the module docstring)."""

    base: float
    bw_lo: float
    bw_hi: float
    phi: float
    sigma_a: float  # stationary std of a_t; the innovation std follows from phi
    amp: float
    period: float
    p_enter: float
    p_exit: float
    offset: float
    p_dip: float
    dip: float
    p_burst: float
    burst: float
    lat_base: float
    lat_gain: float
    rho_l: float
    sd_l: float
    lat_lo: float
    lat_hi: float
    loss_base: float
    loss_gain: float
    loss_hi: float
    rel_base: float
    rel_gain: float
    rel_sd: float
    rel_lo: float
    rel_hi: float

    @property
    def sigma(self) -> float:
        """Innovation std of the AR(1) that gives stationary std ``sigma_a``."""
        return self.sigma_a * math.sqrt(1.0 - self.phi**2)


PARAMS: dict[str, ProfileParams] = {
    # 10 Gbit/s fabric link: tight, slow-moving, rare short congestion.
    "datacenter": ProfileParams(
        base=10_000.0,
        bw_lo=8_000.0,
        bw_hi=12_000.0,
        phi=0.95,
        sigma_a=0.03,
        amp=0.04,
        period=2_000.0,
        p_enter=0.01,
        p_exit=0.10,
        offset=-0.08,
        p_dip=0.01,
        dip=0.10,
        p_burst=0.005,
        burst=0.05,
        lat_base=0.4,
        lat_gain=8.0,
        rho_l=0.8,
        sd_l=0.25,
        lat_lo=0.1,
        lat_hi=2.0,
        loss_base=0.0005,
        loss_gain=0.05,
        loss_hi=0.01,
        rel_base=0.999,
        rel_gain=0.03,
        rel_sd=0.001,
        rel_lo=0.99,
        rel_hi=1.0,
    ),
    # 100 Mbit/s internet path: noisier, more frequent and longer congestion.
    "internet": ProfileParams(
        base=100.0,
        bw_lo=80.0,
        bw_hi=120.0,
        phi=0.9,
        sigma_a=0.05,
        amp=0.05,
        period=2_000.0,
        p_enter=0.02,
        p_exit=0.08,
        offset=-0.10,
        p_dip=0.03,
        dip=0.12,
        p_burst=0.01,
        burst=0.06,
        lat_base=45.0,
        lat_gain=6.0,
        rho_l=0.8,
        sd_l=0.3,
        lat_lo=10.0,
        lat_hi=200.0,
        loss_base=0.003,
        loss_gain=0.25,
        loss_hi=0.05,
        rel_base=0.985,
        rel_gain=0.25,
        rel_sd=0.01,
        rel_lo=0.90,
        rel_hi=0.99,
    ),
}

_erf = np.frompyfunc(math.erf, 1, 1)


def _norm_cdf(z: np.ndarray) -> npt.NDArray[np.float64]:
    return 0.5 * (1.0 + np.asarray(_erf(z / math.sqrt(2.0)), dtype=np.float64))


def _clipped_lognormal_mean(
    m: np.ndarray, s: float, lo: float, hi: float
) -> npt.NDArray[np.float64]:
    """E[clip(exp(m + s Z), lo, hi)] for Z ~ N(0, 1), elementwise in ``m``."""
    z_lo = (math.log(lo) - m) / s
    z_hi = (math.log(hi) - m) / s
    inner = np.exp(m + 0.5 * s * s) * (_norm_cdf(z_hi - s) - _norm_cdf(z_lo - s))
    return lo * _norm_cdf(z_lo) + hi * (1.0 - _norm_cdf(z_hi)) + inner


def _oracle(
    p: ProfileParams, drift: np.ndarray, s_prev: np.ndarray, a_prev: np.ndarray
) -> np.ndarray:
    """E[bw_t | s_{t-1}, a_{t-1}] for t >= 1 (arrays aligned on t)."""
    log_base = math.log(p.base)
    p_congested = np.where(s_prev == 1, 1.0 - p.p_exit, p.p_enter)
    events = ((1.0 - p.p_dip - p.p_burst, 0.0), (p.p_dip, -p.dip), (p.p_burst, p.burst))
    out = np.zeros(drift.shape, dtype=np.float64)
    for p_s, s_next in ((1.0 - p_congested, 0.0), (p_congested, 1.0)):
        for p_e, e in events:
            m = log_base + drift + p.offset * s_next + p.phi * a_prev + e
            out += p_s * p_e * _clipped_lognormal_mean(m, p.sigma, p.bw_lo, p.bw_hi)
    return out


def _oracle_first(p: ProfileParams, drift0: float) -> float:
    """E[bw_0] under the stationary law of (s_0, a_0)."""
    pi = p.p_enter / (p.p_enter + p.p_exit)
    events = ((1.0 - p.p_dip - p.p_burst, 0.0), (p.p_dip, -p.dip), (p.p_burst, p.burst))
    total = 0.0
    for p_s, s in ((1.0 - pi, 0.0), (pi, 1.0)):
        for p_e, e in events:
            m = np.array([math.log(p.base) + drift0 + p.offset * s + e])
            total += p_s * p_e * float(_clipped_lognormal_mean(m, p.sigma_a, p.bw_lo, p.bw_hi)[0])
    return total


def generate(profile: str, n_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one trace of a profile and its oracle one-step expectation.

    Args:
        profile: one of :data:`PROFILES`.
        n_steps: number of 1 s steps (>= 1).
        seed: seeds a fresh ``numpy`` generator; same seed, same trace.

    Returns:
        ``(data, oracle)``: ``data`` float32 ``[n_steps, WIDTH]`` in the
        order of :mod:`bwpredd.schema`, raw units; ``oracle`` float32 ``[n_steps]`` with
        ``oracle[t] = E[bw_t | state after step t-1]`` (see the module docstring).

    Raises:
        ValueError: unknown profile or ``n_steps`` < 1.
    """
    if profile not in PARAMS:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    p = PARAMS[profile]
    rng = np.random.default_rng(seed)
    n = n_steps

    theta = rng.uniform(0.0, 2.0 * math.pi)
    drift = p.amp * np.sin(2.0 * math.pi * np.arange(n) / p.period + theta)

    s = np.empty(n, dtype=np.int8)
    u = rng.random(n)
    s[0] = u[0] < p.p_enter / (p.p_enter + p.p_exit)
    for t in range(1, n):
        s[t] = (u[t] >= p.p_exit) if s[t - 1] else (u[t] < p.p_enter)

    eps = rng.standard_normal(n)
    a = np.empty(n, dtype=np.float64)
    a[0] = p.sigma_a * eps[0]
    for t in range(1, n):
        a[t] = p.phi * a[t - 1] + p.sigma * eps[t]

    ue = rng.random(n)
    e = np.where(ue < p.p_dip, -p.dip, np.where(ue < p.p_dip + p.p_burst, p.burst, 0.0))

    shortfall = p.offset * s + a + e
    bw = np.clip(p.base * np.exp(drift + shortfall), p.bw_lo, p.bw_hi)
    q = np.maximum(0.0, -shortfall)

    xi = rng.standard_normal(n)
    lat_noise = np.empty(n, dtype=np.float64)
    lat_noise[0] = p.sd_l * xi[0]
    innov = p.sd_l * math.sqrt(1.0 - p.rho_l**2)
    for t in range(1, n):
        lat_noise[t] = p.rho_l * lat_noise[t - 1] + innov * xi[t]
    latency = np.clip(p.lat_base * np.exp(p.lat_gain * q + lat_noise), p.lat_lo, p.lat_hi)
    loss = np.clip(
        p.loss_base * np.exp(0.5 * rng.standard_normal(n)) + p.loss_gain * q, 0.0, p.loss_hi
    )
    rel = np.clip(
        p.rel_base - p.rel_gain * q - p.rel_sd * np.abs(rng.standard_normal(n)), p.rel_lo, p.rel_hi
    )

    oracle = np.empty(n, dtype=np.float64)
    oracle[0] = _oracle_first(p, float(drift[0]))
    if n > 1:
        oracle[1:] = _oracle(p, drift[1:], s[:-1], a[:-1])

    data = stack(
        {"latency_ms": latency, "bandwidth_mbps": bw, "packet_loss": loss, "reliability": rel}
    )
    return data, oracle.astype(np.float32)


def synthetic_traces(seed: int, n_traces: int = 40, length: int = 500) -> list[Trace]:
    """Half datacenter, half internet traces, each seeded from ``seed`` and its index.

    The defaults give 40 x 500 = 20,000 samples, twice the origin design's
    10,000. Each trace is its own fold group; the split is done elsewhere.

    Args:
        seed: the one seed for the whole set.
        n_traces: how many traces (>= 2, split evenly; datacenter takes the odd one).
        length: steps per trace (>= 11, one window plus its target).

    Returns:
        Traces with source ``"synthetic_<profile>"``, name
        ``"synthetic_<profile>/<k>"``, step 1 s, every feature measured and
        ``oracle_next_bw`` set.

    Raises:
        ValueError: ``n_traces`` < 2 or ``length`` < 11.
    """
    if n_traces < 2:
        raise ValueError(f"n_traces must be >= 2, got {n_traces}")
    if length < 11:
        raise ValueError(f"length must be >= 11, got {length}")
    counts = {"datacenter": (n_traces + 1) // 2, "internet": n_traces // 2}
    out: list[Trace] = []
    for pi, profile in enumerate(PROFILES):
        for k in range(counts[profile]):
            # Independent streams per (seed, profile, k), stable across n_traces.
            trace_seed = int(np.random.SeedSequence([seed, pi, k]).generate_state(1)[0])
            data, oracle = generate(profile, length, trace_seed)
            name = f"synthetic_{profile}/{k:04d}"
            out.append(
                Trace(
                    source=f"synthetic_{profile}",
                    name=name,
                    group=name,
                    step_s=1.0,
                    data=data,
                    measured=FEATURES,
                    time_s=np.arange(length, dtype=np.float64),
                    oracle_next_bw=oracle,
                )
            )
    return out
