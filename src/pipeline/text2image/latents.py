"""What the frozen parts of the backbone compute once: VAE posteriors and prompt embeddings.

diffusers' train_text_to_image.py encodes every batch again and draws `latent_dist.sample()` each step.
With the VAE and text encoder frozen that work is the same every epoch, so the posterior's parameters
(mean and log-variance) and each prompt's text-encoder states are cached by a rule of their own, and the
training objectives draw a fresh latent from the cached posterior at every step: the same distribution
of training latents as the recipe, without its encoder passes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.noise import BatchNoise


def images_to_vae_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range (diffusers normalize([0.5], [0.5]))."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_posteriors(vae, images: np.ndarray, batch_size: int = 32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The VAE posterior of every image, (N, 2 x latent channels, h, w): mean then log-variance, as
    diffusers' `DiagonalGaussianDistribution.parameters` holds them."""
    out = []
    for lo in tqdm(range(0, len(images), batch_size), desc="encode", mininterval=5):
        x = images_to_vae_input(images[lo:lo + batch_size]).to(device=device, dtype=vae.dtype)
        out.append(vae.encode(x).latent_dist.parameters.float().cpu())
    return torch.cat(out)


def sample_latents(posteriors: torch.Tensor, noise: BatchNoise, scaling_factor: float) -> torch.Tensor:
    """One draw from each cached posterior, scaled as the UNet sees latents (`vae.config.scaling_factor`)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(posteriors)  # its clamp of the log-variance, its std
    eps = noise.randn(dist.mean.shape[1:], dtype=dist.mean.dtype)
    return (dist.mean + dist.std * eps) * scaling_factor


@torch.no_grad()
def embed_prompts(tokenizer, text_encoder, prompts: Sequence[str], batch_size: int = 64,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Text-encoder hidden states of each prompt, (P, max_length, width), padded to the tokenizer's full
    length and truncated there, as Stable Diffusion's pipelines and training scripts encode prompts."""
    out = []
    for lo in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[lo:lo + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)
