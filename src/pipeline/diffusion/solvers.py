"""PF-ODE steps and samplers in the EDM (variance-exploding, sigma = t) parameterization.

dx/dsigma = (x - D(x, sigma)) / sigma. Steps take a per-sample sigma tensor because consistency
distillation draws a different grid index for every item of a batch; diffusers' schedulers step a
single scalar timestep for the whole batch, so these few lines are written here instead.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .karras import RHO, karras_sigmas

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


NoiseSource = Callable[[], torch.Tensor]


@torch.no_grad()
def edm_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = RHO, S_churn: float = 0.0, S_min: float = 0.0,
               S_max: float = float("inf"), S_noise: float = 1.0,
               churn_noise: NoiseSource | None = None) -> torch.Tensor:
    """EDM's sampler (NVlabs/edm generate.py `edm_sampler`; Karras et al. 2022, Algorithm 2).

    At each level sigma in [S_min, S_max] the noise is first raised to sigma_hat = (1 + gamma) sigma,
    gamma = min(S_churn / steps, sqrt(2) - 1), by adding fresh noise sqrt(sigma_hat^2 - sigma^2)
    S_noise eps, then one Heun step goes to the next level (Euler into sigma = 0). `churn_noise()`
    returns eps for the whole batch, one call per step as edm_sampler draws it, so each sample's
    stream can come from its own seed. With S_churn = 0 no noise is added and this is exactly the
    deterministic Heun sampler (Algorithm 1), with 2 * steps - 1 evaluations either way.
    """
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho).tolist() + [0.0]
    gamma_max = min(S_churn / steps, math.sqrt(2) - 1)
    if S_churn > 0 and churn_noise is None:
        raise ValueError("stochastic sampling (S_churn > 0) needs a churn noise source")
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if S_churn > 0:
            eps = churn_noise()
            gamma = gamma_max if S_min <= s <= S_max else 0.0
            if gamma > 0:
                s_hat = s + gamma * s
                x = x + math.sqrt(s_hat ** 2 - s ** 2) * S_noise * eps.to(x)
                s = s_hat
        x = heun_step(denoiser, x, s, s_next) if s_next > 0 else euler_step(denoiser, x, s, s_next)
    return x


def heun_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int = 18, sigma_min: float = 0.002,
                sigma_max: float = 80.0, rho: float = RHO) -> torch.Tensor:
    """EDM's deterministic sampler (Algorithm 1): `steps` levels then sigma = 0, 2*steps - 1 evaluations."""
    return edm_sample(denoiser, noise, steps, sigma_min, sigma_max, rho)


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, steps: int, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = RHO, denoise: bool = False) -> torch.Tensor:
    """`steps` Euler steps of the PF-ODE on the Karras grid of steps + 1 levels: `steps` evaluations.

    How a progressively distilled student samples (consistency_models_cifar10 jcm/sampling.py
    get_progressive_distillation_sampler: Euler on the same grid, `denoise=False`, ending at
    sigma_min). In EDM's variance-exploding form DDIM's update D + (sigma'/sigma)(x - D) is this
    Euler step. Grids of N and 2N steps nest (karras_sigmas(2N + 1)[::2] = karras_sigmas(N + 1)),
    which is what lets one student step stand for two teacher steps. `denoise`: the last step goes
    to sigma = 0 instead of sigma_min, returning D there; one step with it is D(sigma_max z, sigma_max),
    how DMD's one-step generator samples (tianweiy/DMD2 main/edm/test_folder_edm.py).
    """
    sigmas = karras_sigmas(steps + 1, sigma_min, sigma_max, rho).tolist()
    if denoise:
        sigmas[-1] = 0.0
    x = noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = euler_step(denoiser, x, s, s_next)
    return x


@torch.no_grad()
def refine_sample(denoiser: Denoiser, x0: torch.Tensor, noise: torch.Tensor, sigma: float, steps: int = 18,
                  sigma_min: float = 0.002, rho: float = RHO) -> torch.Tensor:
    """"+refine" (the study's App. A.1): perturb a sample x0 to level sigma, x0 + sigma z, and solve the
    teacher's PF-ODE back with EDM's Heun sampler on a `steps`-level Karras grid from sigma.

    x0 + sigma z = sigma (z + x0 / sigma), so this is edm_sample from the noise z + x0 / sigma with
    sigma_max = sigma: at the teacher's own sigma_max the refine is the teacher sampling from noise
    that differs from fresh noise by x0 / sigma_max (at most 1/80 per pixel in [-1, 1] for EDM).
    """
    if not sigma_min < sigma:
        raise ValueError(f"the refine level {sigma} must lie above sigma_min {sigma_min}")
    return edm_sample(denoiser, noise + x0 / sigma, steps, sigma_min, sigma, rho)


def heun_nfe(steps: int) -> int:
    return 2 * steps - 1


@torch.no_grad()
def consistency_sample(model: Denoiser, noises: Sequence[torch.Tensor], ts: Sequence[float],
                       sigma_min: float = 0.002, clip_denoised: bool = True) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1).

    `noises[k]` is the fresh Gaussian noise for step k (len(ts) tensors); ts[0] is sigma_max. One
    network evaluation per entry of ts. With `clip_denoised` every prediction is clamped to the data
    range [-1, 1] before it is re-noised, as the reference multistep sampler does
    (openai/consistency_models cm/karras_diffusion.py: karras_sample's denoiser clamps when
    clip_denoised, the default of scripts/image_sample.py).
    """
    if len(noises) != len(ts):
        raise ValueError(f"need one noise tensor per step: {len(noises)} != {len(ts)}")

    def f(x, t):
        out = model(x, torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype))
        return out.clamp(-1, 1) if clip_denoised else out

    x = f(noises[0] * ts[0], ts[0])
    for z, t in zip(noises[1:], ts[1:]):
        x = f(x + (t ** 2 - sigma_min ** 2) ** 0.5 * z, t)
    return x
