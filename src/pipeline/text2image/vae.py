"""Training the miniature's AutoencoderKL (Stable Diffusion's VAE arrives trained; the miniature's cannot).

The loss is latent-diffusion's autoencoder objective without its perceptual and adversarial terms,
which need networks the miniature does not have: the squared reconstruction error of a posterior draw
plus kl_weight x KL(posterior || N(0, I)), both summed over the image as there (here divided by its
number of pixel values, which scales both terms alike), kl_weight 1e-6 as in CompVis/latent-diffusion
configs/autoencoder/autoencoder_kl_*.yaml (`kl_weight: 0.000001`). The latent scaling factor is then
set the way latent diffusion set Stable Diffusion's 0.18215 (`scale_by_std`): one over the standard
deviation of the training latents, so the UNet sees latents of unit variance.
"""
from __future__ import annotations

import torch

from ..diffusion.noise import BatchNoise


class VAEObjective:
    """The shared training loop's objective: rows are images in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module, kl_weight: float = 1e-6):
        self.model = vae
        self.kl_weight = float(kl_weight)

    def loss(self, model, y, noise, labels=None):
        noise = BatchNoise.of(noise, y.shape[0], y.device)
        dist = model.encode(y).latent_dist
        z = dist.mean + dist.std * noise.randn(dist.mean.shape[1:], dtype=dist.mean.dtype)
        recon = model.decode(z).sample
        rec = (recon.float() - y.float()).square().mean(dim=(1, 2, 3))
        return rec + self.kl_weight * dist.kl().float() / y[0].numel()

    def after_step(self, model, step):
        pass

    def extra_modules(self):
        return {}


@torch.no_grad()
def latent_scaling_factor(posteriors: torch.Tensor, seed: int = 0) -> float:
    """1 / std of one draw from each cached posterior (latent diffusion's `scale_by_std`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(posteriors.float())
    z = dist.sample(torch.Generator().manual_seed(seed))
    return float(1.0 / z.flatten().std())
