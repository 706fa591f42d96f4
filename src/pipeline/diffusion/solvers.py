"""PF-ODE steps and samplers in the EDM (variance-exploding, sigma = t) parameterization.

dx/dsigma = (x - D(x, sigma)) / sigma. Steps take a per-sample sigma tensor because consistency
distillation draws a different grid index for every item of a batch; diffusers' schedulers step a
single scalar timestep for the whole batch, so these few lines are written here instead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .karras import karras_sigmas

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def euler_step(denoiser: Denoiser, x, sigma_cur, sigma_next):
    s, s_next = _col(sigma_cur, x), _col(sigma_next, x)
    d = (x - denoiser(x, s.flatten())) / s
    return x + (s_next - s) * d


def heun_step(denoiser: Denoiser, x, sigma_cur, sigma_next):
    """Heun's second-order step from sigma_cur to sigma_next > 0 (2 denoiser evaluations)."""
    s, s_next = _col(sigma_cur, x), _col(sigma_next, x)
    d = (x - denoiser(x, s.flatten())) / s
    x_euler = x + (s_next - s) * d
    d_next = (x_euler - denoiser(x_euler, s_next.flatten())) / s_next
    return x + (s_next - s) * (d + d_next) / 2


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's deterministic sampler (Algorithm 1): `steps` levels then sigma = 0, 2*steps - 1 evaluations."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist() + [0.0]
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(denoiser, x, s, s_next) if s_next > 0 else euler_step(denoiser, x, s, s_next)
    return x


def heun_nfe(steps: int) -> int:
    return 2 * steps - 1


@torch.no_grad()
def consistency_sample(model: Denoiser, noises: Sequence[torch.Tensor], ts: Sequence[float],
                       sigma_min: float = 0.002) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    `noises[k]` is the fresh Gaussian noise for step k (len(ts) tensors); ts[0] is sigma_max. One
    network evaluation per entry of ts.
    """
    if len(noises) != len(ts):
        raise ValueError(f"need one noise tensor per step: {len(noises)} != {len(ts)}")
    x = model(noises[0] * ts[0], torch.full((noises[0].shape[0],), float(ts[0]), device=noises[0].device, dtype=noises[0].dtype))
    for z, t in zip(noises[1:], ts[1:]):
        x_t = x + (t ** 2 - sigma_min ** 2) ** 0.5 * z
        x = model(x_t, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))
    return x
