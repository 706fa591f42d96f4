"""The Karras et al. (2022) noise-level grid used by the EDM sampler and by consistency distillation."""
from __future__ import annotations

import torch

RHO = 7.0  # the grid's curvature everywhere a config leaves `rho` out (NVlabs/edm generate.py edm_sampler rho=7)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = RHO,
                  dtype=torch.float64) -> torch.Tensor:
    """n noise levels from sigma_max down to sigma_min, evenly spaced in sigma^(1/rho).

    Same grid as diffusers' EDMEulerScheduler (checked in tests) but returned as a plain tensor,
    since consistency distillation indexes it per sample rather than stepping a stateful scheduler.
    """
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 levels, got {n}")
    return karras_curve(torch.linspace(0, 1, n, dtype=dtype), sigma_min, sigma_max, rho)


def karras_curve(u: torch.Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = RHO) -> torch.Tensor:
    """The curve the grid samples, at u in [0, 1]: sigma_max at 0, sigma_min at 1, linear in sigma^(1/rho).
    Progressive distillation reads it between grid points (its teacher's half steps)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + u * (lo - hi)) ** rho
