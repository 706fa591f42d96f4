"""Sampling the text-to-image teacher and its LCM student through diffusers' own pipelines.

The teacher samples with `StableDiffusionPipeline` and the scheduler its sampler names (Stable
Diffusion's own is PNDM at 50 steps, guidance 7.5); the student with `LatentConsistencyModelPipeline`
and `LCMScheduler` (4 steps over LCM's 50-step grid, guidance embedded as w = guidance_scale - 1).
Both schedulers are built from the backbone's noise schedule. Sample i starts from latent noise seeded
by (run seed, i) alone, and every noise draw between steps (LCM's, or an ancestral scheduler's) comes
from a CPU generator of its own seeded from the same value, so a sample does not depend on its batch,
its shard or the device.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..diffusion.noise import step_seed
from ..sample import NoiseStream
from .backbone import Backbone

TEACHER_SCHEDULERS = ("PNDMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
                      "EulerAncestralDiscreteScheduler", "DDPMScheduler")
STEP_NOISE = 1  # second word of the seed of a sample's between-step noise: a stream apart from its start noise


def build_pipeline(backbone: Backbone, unet, sampler: Mapping[str, Any]):
    """The diffusers pipeline that runs `sampler` (kind `lcm`, or `diffusion` with a named scheduler)."""
    import diffusers

    common = dict(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=unet,
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if sampler["kind"] == "lcm":
        if unet.config.time_cond_proj_dim is None:
            raise ValueError("the lcm sampler needs an LCM student (a UNet with a guidance embedding)")
        scheduler = diffusers.LCMScheduler.from_config(
            backbone.scheduler.config, original_inference_steps=sampler.get("original_steps", 50))
        pipe = diffusers.LatentConsistencyModelPipeline(scheduler=scheduler, **common)
    elif sampler["kind"] == "diffusion":
        name = sampler.get("scheduler", "PNDMScheduler")
        if name not in TEACHER_SCHEDULERS:
            raise ValueError(f"unknown teacher scheduler {name!r}; known: {', '.join(TEACHER_SCHEDULERS)}")
        scheduler = getattr(diffusers, name).from_config(backbone.scheduler.config)
        pipe = diffusers.StableDiffusionPipeline(scheduler=scheduler, **common)
    else:
        raise ValueError(f"unknown text-to-image sampler kind {sampler['kind']!r}: diffusion or lcm")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_text2image(pipe, prompts: Sequence[str], seeds: Sequence[int], sampler: Mapping[str, Any],
                        resolution: int, device: torch.device | str = "cpu") -> np.ndarray:
    """One image per (prompt, seed) with the pipeline's sampler; returns uint8 NHWC."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    shape = (pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    # Each sample's start noise from its own seed, drawn on the CPU (the EDM samplers' NoiseStream); the
    # pipeline multiplies it by the scheduler's initial noise sigma (1 for these schedules).
    latents = NoiseStream(seeds, shape, device)()
    generators = [torch.Generator().manual_seed(step_seed(int(s), STEP_NOISE)) for s in seeds]
    kwargs = dict(prompt=list(prompts), height=resolution, width=resolution, num_inference_steps=int(sampler["steps"]),
                  guidance_scale=float(sampler.get("guidance_scale", 8.5 if sampler["kind"] == "lcm" else 7.5)),
                  latents=latents, generator=generators, output_type="np")
    if sampler["kind"] == "lcm":
        kwargs["original_inference_steps"] = int(sampler.get("original_steps", 50))
    images = pipe(**kwargs).images
    return np.clip(np.rint(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def sample_prompts(prompts: Mapping[str, Sequence[str]], indices: Sequence[int]) -> tuple[list[str], list[str]]:
    """(prompt, prompt group) of each sample index: the memorized prompts then the held-out ones, in turn,
    so sample i's prompt depends on i alone and every prompt gets num_samples / P samples."""
    listed = [(p, "memorized") for p in prompts.get("memorized", [])] + [(p, "held_out") for p in prompts.get("held_out", [])]
    if not listed:
        raise ValueError("a text-to-image model lists no prompts to sample")
    chosen = [listed[int(i) % len(listed)] for i in indices]
    return [p for p, _ in chosen], [g for _, g in chosen]


def sample_text2image(model, meta: Mapping[str, Any], sampler: Mapping[str, Any], indices: Sequence[int],
                      seeds: Sequence[int], batch_size: int, device: str, desc: str):
    """Images, prompts and prompt groups of the given sample indices for a text-to-image model."""
    from tqdm.auto import tqdm

    from .backbone import load_backbone
    from .runs import backbone_provider

    want = "lcm" if meta["kind"] == "latent-consistency" else "diffusion"
    if sampler["kind"] != want:
        raise ValueError(f"a {meta['kind']} model samples with a {want} sampler, not {sampler['kind']}")
    backbone = load_backbone(meta["backbone"], backbone_provider(meta["backbone"]), device=device, with_unet=False)
    pipe = build_pipeline(backbone, model.to(device), sampler)
    prompts, groups = sample_prompts(meta["prompts"], indices)
    images = [generate_text2image(pipe, prompts[lo:lo + batch_size], seeds[lo:lo + batch_size], sampler,
                                  meta["resolution"], device)
              for lo in tqdm(range(0, len(seeds), batch_size), desc=desc, mininterval=5)]
    return np.concatenate(images), prompts, groups
