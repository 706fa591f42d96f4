"""The edge-of-memorization lab's numpy-only part (theory/edge.py's docstring derives it): the time grid and
diffusionlab's forward process, the crossover formulas, and the crossing of two sampled curves. Apart
from edge.py so that the report (report environment, no torch) draws the formulas from the same code."""
from __future__ import annotations

import numpy as np

# The upstream per-point charge (loss_approximations.py:43) and the one edge.py's docstring derives (an
# asymptotic value: edge.py's docstring; the lab fits the finite-d one, `empirical_charge`).
CHARGE_UPSTREAM = 1.0
CHARGE_NEAREST_POINT = 2.0


def time_grid(spec: dict) -> np.ndarray:
    """`num` times evenly spaced in [min, max] (diffusionlab's UniformScheduler), descending."""
    return np.linspace(spec["max"], spec["min"], spec["num"])


def alpha_sigma(t):
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(1.0 - t ** 2), t


def snr(t):
    alpha, sigma = alpha_sigma(t)
    return alpha ** 2 / sigma ** 2


def analytic_excess(d: int, sigma0: float, n: int, times: np.ndarray, sizes, charge: float, weight=None) -> dict:
    """The crossover formulas (edge.py's docstring): per-time excess losses over the memorizer, their
    grid means, and the predicted K*/n. `weight`: a per-time weight on the x0-unit losses (default 1,
    the lab's; upstream's eps-unit loss with unit weight is weight = snr(times), `loss_scaling.py`'s X0 to
    EPS factor (alpha / sigma)^2 times `evaluate.py`'s `time_dependent_ones`). The partial memorizer's
    excess is the same at every time, so the crossover is 1 - <w gen>_t / (<w>_t c d sigma0^2)."""
    s0 = sigma0 ** 2
    psi = snr(times)
    w = np.ones_like(psi) if weight is None else np.broadcast_to(np.asarray(weight, dtype=np.float64), psi.shape)
    gen = d * s0 / (1 + psi * s0)
    frac = np.asarray(sizes, dtype=np.float64) / n
    pmem = charge * d * s0 * (1 - frac)
    return {"generalizer": float((w * gen).mean() / w.mean()), "partial": pmem,
            "crossover": float(1 - (w * gen).sum() / (w.sum() * charge * d * s0))}


def empirical_charge(fractions, partial, memorizer: float, d: int, sigma0: float) -> float:
    """The charge per missing point fitted from brute-force losses: the partial memorizers' excess over the
    memorizer, pooled over every size K < n, per missing point and d sigma0^2,
        c = sum_K (L_K - L_mem) / sum_K d sigma0^2 (1 - K/n)
    (least squares through K = n with weights 1 / (n - K): the excess is a sum of n - K per-point costs,
    so its variance grows like n - K). `partial`: the grid-mean loss at each size (mean over subsets).
    A size so small that a whole mode can go unkept adds that mode's larger cost. nan when no size is
    below n."""
    frac = np.asarray(fractions, dtype=np.float64)
    below = frac < 1
    if not below.any():
        return float("nan")
    excess = np.asarray(partial, dtype=np.float64)[below] - memorizer
    return float(excess.sum() / (d * sigma0 ** 2 * (1 - frac[below])).sum())


def crossing(x: np.ndarray, y: np.ndarray) -> float:
    """The first x where y (sampled at ascending x) falls from positive to non-positive, linearly
    interpolated; x[0] when y starts non-positive, nan when it never gets there."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if y[0] <= 0:
        return float(x[0])
    for i in range(1, len(x)):
        if y[i] <= 0:
            return float(x[i - 1] + (x[i] - x[i - 1]) * y[i - 1] / (y[i - 1] - y[i]))
    return float("nan")
