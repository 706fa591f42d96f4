"""The latent diffusion backbone: tokenizer, text encoder, VAE, UNet and noise schedule.

Stable Diffusion v1.5 arrives as a diffusers folder (model_index.json, tokenizer/, text_encoder/,
vae/, unet/, scheduler/) placed by the fetch rule; the miniature is built from config and written in
the same layout, so everything downstream reads one format through diffusers' own loaders. Weights are
read from safetensors only (`use_safetensors=True`): no pickle is ever unpickled.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..data.fetch import SD15_FILES, SD15_REPO, SD15_REVISION, SD15_SHA256, fetch_hub_snapshot

log = logging.getLogger(__name__)

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
# Stable Diffusion v1.5's noise schedule (scheduler/scheduler_config.json of
# stable-diffusion-v1-5/stable-diffusion-v1-5, a PNDMScheduler config): the miniature uses it unchanged.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                     timestep_spacing="leading", prediction_type="epsilon")

def fetch_sd15(dest: str | Path, repo: str = SD15_REPO, revision: str = SD15_REVISION) -> Path:
    """Stable Diffusion v1.5's inference files into `dest` (login node), checked against the pinned digests."""
    expected = SD15_SHA256 if (repo, revision) == (SD15_REPO, SD15_REVISION) else None
    required = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json"] + list(SD15_SHA256)
    return fetch_hub_snapshot(dest, repo, revision, SD15_FILES, required, "Stable Diffusion v1.5 in diffusers' layout",
                              expected)


@dataclass
class Backbone:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    scheduler: Any  # the training noise schedule, a DDPMScheduler read from scheduler/ as diffusers' scripts do

    def frozen(self) -> "Backbone":
        """Text encoder and VAE in eval mode without gradients: the study fine-tunes the UNet only."""
        for m in (self.text_encoder, self.vae):
            m.requires_grad_(False).eval()
        return self


def check_backbone_dir(path: str | Path, provider: str, unet: bool = True) -> Path:
    """Raise one FileNotFoundError naming every missing part of a backbone folder and what provides it."""
    path = Path(path)
    needed = ["model_index.json"] + [f"{s}/" for s in SUBFOLDERS if unet or s != "unet"]
    missing = [n for n in needed if not (path / n.rstrip("/")).exists()]
    if missing:
        raise FileNotFoundError(f"the diffusion backbone {path} lacks {', '.join(missing)}: {provider} provides it")
    return path


def load_backbone(path: str | Path, provider: str, unet_dir: str | Path | None = None,
                  device: torch.device | str = "cpu", with_unet: bool = True) -> Backbone:
    """Read a backbone folder; `unet_dir` (a folder with config.json + safetensors) replaces its UNet, and
    without `with_unet` none is read (a stage that brings its own fine-tuned UNet)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = check_backbone_dir(path, provider, unet=with_unet and unet_dir is None)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True,
                                                 local_files_only=True)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, local_files_only=True)
    if not with_unet:
        unet = None
    elif unet_dir is None:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, local_files_only=True)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    return Backbone(tokenizer, text_encoder.to(device), vae.to(device), unet and unet.to(device), scheduler).frozen()


def save_backbone(backbone: Backbone, out_dir: str | Path) -> Path:
    """Write `backbone` as a Stable Diffusion folder (StableDiffusionPipeline.save_pretrained), atomically."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ..io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder,
                                       tokenizer=backbone.tokenizer, unet=backbone.unet,
                                       scheduler=PNDMScheduler.from_config(backbone.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def save_unet(unet: torch.nn.Module, out_dir: str | Path) -> Path:
    """A fine-tuned or distilled UNet alone (config.json + safetensors): the backbone's other parts are shared."""
    from ..io import atomic_directory

    with atomic_directory(out_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def build_tiny_backbone(spec: Mapping[str, Any], prompts: Sequence[str], resolution: int, channels: int,
                        tokenizer_dir: str | Path, seed: int = 0) -> Backbone:
    """A miniature Stable Diffusion from config: a word-level tokenizer over `prompts`, a CLIP text model,
    an AutoencoderKL for `channels`-channel images and a UNet2DConditionModel on its latents, freshly
    initialised from `seed`. The VAE still has to be trained (`train_vae`) before it means anything."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import build_word_tokenizer

    torch.manual_seed(seed)
    tok_cfg, text_cfg = dict(spec.get("tokenizer", {})), dict(spec["text_encoder"])
    tokenizer = build_word_tokenizer(list(prompts) + [""], tokenizer_dir, tok_cfg.get("max_length", 16))
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.convert_tokens_to_ids(tokenizer.bos_token), eos_token_id=eos, pad_token_id=eos,
        **text_cfg))
    vae_cfg = dict(spec["vae"])
    blocks = list(vae_cfg.pop("block_out_channels"))
    vae = AutoencoderKL(in_channels=channels, out_channels=channels, block_out_channels=blocks,
                        down_block_types=["DownEncoderBlock2D"] * len(blocks),
                        up_block_types=["UpDecoderBlock2D"] * len(blocks), sample_size=resolution, **vae_cfg)
    scale = 2 ** (len(blocks) - 1)
    if resolution % scale:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's downsampling factor {scale}")
    unet = UNet2DConditionModel(sample_size=resolution // scale, in_channels=vae.config.latent_channels,
                                out_channels=vae.config.latent_channels,
                                cross_attention_dim=text_encoder.config.hidden_size, **dict(spec["unet"]))
    scheduler = DDPMScheduler.from_config(SD15_SCHEDULE)
    return Backbone(tokenizer, text_encoder, vae, unet, scheduler)
