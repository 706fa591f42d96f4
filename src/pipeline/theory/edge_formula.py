"""The edge-of-memorization lab's numpy-only part (theory/edge.py's docstring derives it): the time grid and
diffusionlab's forward process, the crossover formulas, and the crossing of two sampled curves. Apart
from edge.py so that the report (report environment, no torch) draws the formulas from the same code."""
from __future__ import annotations

import numpy as np

# The upstream per-point charge (loss_approximations.py:43) and the one edge.py's docstring derives.
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


def analytic_excess(d: int, sigma0: float, n: int, times: np.ndarray, sizes, charge: float) -> dict:
    """The crossover formulas (edge.py's docstring): per-time excess losses over the memorizer, their
    grid means, and the predicted K*/n."""
    s0 = sigma0 ** 2
    psi = snr(times)
    gen = d * s0 / (1 + psi * s0)
    frac = np.asarray(sizes, dtype=np.float64) / n
    pmem = charge * d * s0 * (1 - frac)
    return {"generalizer": float(gen.mean()), "partial": pmem, "crossover": float(1 - gen.mean() / (charge * d * s0))}


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
