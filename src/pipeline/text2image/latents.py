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
    """uint8 NHWC -> float NCHW in [-1, 1], the VAE's input range (diffusers normalize([0.5], [0.5])).
    The batch is copied first: image tables are read into read-only buffers."""
    return torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


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


POSTERIORS, PROMPTS, EMPTY = "posteriors", "prompt_embeddings", "empty_prompt_embedding"


def write_latent_cache(path, posteriors: torch.Tensor, prompt_embeddings: torch.Tensor, empty: torch.Tensor,
                       scaling_factor: float, subset_sha256: str, backbone: str) -> None:
    """One safetensors file per (subset, backbone): row i of each tensor belongs to subset row i."""
    from safetensors.torch import save_file

    from ..io import atomic_output

    if len(posteriors) != len(prompt_embeddings):
        raise ValueError(f"{len(posteriors)} posteriors for {len(prompt_embeddings)} prompts")
    with atomic_output(path) as tmp:
        save_file({POSTERIORS: posteriors.contiguous(), PROMPTS: prompt_embeddings.contiguous(),
                   EMPTY: empty.contiguous()}, str(tmp),
                  metadata={"scaling_factor": repr(float(scaling_factor)), "subset_sha256": subset_sha256,
                            "backbone": str(backbone)})


def read_latent_cache(path, subset_sha256: str | None = None) -> tuple[dict, dict]:
    """(tensors, metadata) of a latent cache; refuses one made from another version of the subset."""
    from safetensors import safe_open

    from ..io import CorruptFileError

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: the cache_latents rule writes it (snakemake {path})") from None
    except Exception as exc:
        raise CorruptFileError(f"{path}: unreadable latent cache ({exc}); delete it and rerun cache_latents") from exc
    missing = [k for k in (POSTERIORS, PROMPTS, EMPTY) if k not in tensors]
    if missing or "scaling_factor" not in meta:
        raise CorruptFileError(f"{path}: not a latent cache (missing {missing or 'scaling_factor'})")
    if subset_sha256 is not None and meta.get("subset_sha256") != subset_sha256:
        raise ValueError(f"{path} was cached from another version of the subset; rerun cache_latents")
    meta["scaling_factor"] = float(meta["scaling_factor"])
    return tensors, meta
