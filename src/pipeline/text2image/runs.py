"""The text-to-image stages the rules run: build the miniature backbone, cache latents, fine-tune the
teacher, LCM-distil the student. Each reads and writes files only; the work is in the modules beside it."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..data.sources import load_captioned
from ..io import sha256_file
from ..modelio import model_snapshots, save_model
from ..nets import count_parameters
from ..train import TrainConfig, publish_snapshots, train
from .backbone import build_tiny_backbone, load_backbone, save_backbone
from .finetune import LatentDenoisingObjective, PromptTable
from .latents import (EMPTY, POSTERIORS, PROMPTS, embed_prompts, encode_posteriors, images_to_vae_input,
                      read_latent_cache, write_latent_cache)
from .lcm import LCM_DEFAULTS, LCMObjective, lcm_student
from .vae import VAEObjective, latent_scaling_factor

log = logging.getLogger(__name__)


def backbone_provider(path: str | Path) -> str:
    return (f"the fetch_sd15 rule (Stable Diffusion v1.5) or, for a miniature, the build_backbone rule "
            f"(snakemake {Path(path) / 'model_index.json'})")


def build_miniature(dataset: Mapping[str, Any], spec: Mapping[str, Any], out_dir: str | Path,
                    work_dir: str | Path) -> dict:
    """A miniature Stable Diffusion for a captioned dataset: tokenizer over all its captions (so held-out
    prompts encode too), text encoder and UNet initialised from `spec["seed"]`, VAE trained on all its
    images (the study's VAE saw far more than the fine-tuning set too), latent scale set from them."""
    accelerator = Accelerator()
    source = load_captioned(dict(dataset))
    images = source.read(np.arange(len(source)))
    resolution, channels = images.shape[1], images.shape[3]
    seed = int(spec.get("seed", 0))
    bb = build_tiny_backbone(spec, source.prompts, resolution, channels, Path(work_dir) / "tokenizer", seed)
    vcfg = TrainConfig.from_dict(spec["vae_train"])
    set_seed(vcfg.seed)
    x = images_to_vae_input(images)
    log.info("miniature backbone: %d images at %dx%dx%d, %d prompts; training the VAE (%d parameters)",
             len(images), resolution, resolution, channels, len(set(source.prompts)), count_parameters(bb.vae))
    vae, stats = train(VAEObjective(bb.vae, spec.get("kl_weight", 1e-6)), x, np.arange(len(x)), vcfg, accelerator,
                       Path(work_dir) / "checkpoint", json.dumps(dict(spec), sort_keys=True))
    bb.vae = vae
    bb.frozen()
    scale = latent_scaling_factor(encode_posteriors(bb.vae, images, batch_size=256), seed)
    bb.vae.register_to_config(scaling_factor=scale)
    if accelerator.is_main_process:
        save_backbone(bb, out_dir)
    log.info("VAE loss %.5f after %d steps; latent scaling factor %.4f", stats["final_loss"], vcfg.steps, scale)
    return {"vae_final_loss": stats["final_loss"], "scaling_factor": scale}


def cache_latents(subset_path: str | Path, backbone_dir: str | Path, out_path: str | Path,
                  batch_size: int = 32) -> None:
    """VAE posteriors and prompt embeddings of every subset row, and the empty prompt's embedding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    subset = read_subset(subset_path)
    if subset.prompts is None:
        raise ValueError(f"{subset_path} has no prompts: latents are cached for text_memorization subsets")
    bb = load_backbone(backbone_dir, backbone_provider(backbone_dir), device=device, with_unet=False)
    posteriors = encode_posteriors(bb.vae, subset.images, batch_size, device)
    prompts = embed_prompts(bb.tokenizer, bb.text_encoder, list(subset.prompts), device=device)
    empty = embed_prompts(bb.tokenizer, bb.text_encoder, [""], device=device)[0]
    write_latent_cache(out_path, posteriors, prompts, empty, bb.vae.config.scaling_factor, sha256_file(subset_path),
                       str(backbone_dir))
    log.info("cached %d posteriors %s and prompt embeddings %s", len(posteriors), tuple(posteriors.shape[1:]),
             tuple(prompts.shape[1:]))


def sampling_prompts(subset) -> dict:
    """The prompts a text-to-image model is sampled on: its memorized pairs' (distinct, in subset order)
    and the subset's held-out ones."""
    memorized = list(dict.fromkeys(p for p, g in zip(subset.prompts, subset.group) if g == "memorized"))
    return {"memorized": memorized, "held_out": list(subset.held_out_prompts or [])}


def _text_meta(kind: str, backbone_dir, unet, subset, prompts: Mapping[str, list]) -> dict:
    resolution, channels = subset.images.shape[1], subset.images.shape[3]
    return {"kind": kind, "backbone": str(backbone_dir), "unet": {k: v for k, v in unet.config.items() if not k.startswith("_")},
            "resolution": int(resolution), "channels": int(channels), "prompts": dict(prompts)}


def finetune_teacher(subset_path: str | Path, latents_path: str | Path, backbone_dir: str | Path,
                     out_dir: str | Path, spec: Mapping[str, Any], checkpoint_dir: str | Path | None = None,
                     metrics_log: str | Path | None = None) -> dict:
    """Fine-tune the backbone's UNet on a text_memorization subset (VAE and text encoder frozen)."""
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(spec["train"])
    set_seed(tcfg.seed)
    subset = read_subset(subset_path)
    cache, cmeta = read_latent_cache(latents_path, sha256_file(subset_path))
    bb = load_backbone(backbone_dir, backbone_provider(backbone_dir))
    unet = bb.unet.train().requires_grad_(True)
    if spec.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    latent = dict(spec.get("latent", {}))
    objective = LatentDenoisingObjective(unet, bb.scheduler, cmeta["scaling_factor"],
                                         PromptTable(cache[PROMPTS], cache[EMPTY]), latent.get("empty_prompt_ratio", 0.0))
    prompts = sampling_prompts(subset)
    meta = _text_meta("latent-diffusion", backbone_dir, unet, subset, prompts)
    log.info("fine-tuning %d UNet parameters on %d pairs (%d with repeats), %d memorized prompts, %d processes",
             count_parameters(unet), len(subset), len(subset.expanded_indices()), len(prompts["memorized"]),
             accelerator.num_processes)
    fingerprint = json.dumps({"backbone": str(backbone_dir), "latent": latent, "subset": sha256_file(subset_path),
                              "snapshots": spec.get("snapshots", [])}, sort_keys=True)
    snapshots = model_snapshots(spec.get("snapshots"), checkpoint_dir, out_dir, meta, "finetune")
    ema, stats = train(objective, cache[POSTERIORS], subset.expanded_indices(), tcfg, accelerator, checkpoint_dir,
                       fingerprint, snapshots, metrics_log, labels=torch.arange(len(subset)))
    stats.update(parameters=count_parameters(unet), subset=str(subset_path), unique_images=len(subset))
    if accelerator.is_main_process:
        publish_snapshots(snapshots, out_dir)
        save_model(out_dir, ema, meta, stats)
    accelerator.end_training()
    return stats


def distill_lcm(teacher_dir: str | Path, subset_path: str | Path, latents_path: str | Path, out_dir: str | Path,
                spec: Mapping[str, Any], checkpoint_dir: str | Path | None = None,
                metrics_log: str | Path | None = None) -> dict:
    """Latent consistency distillation of a fine-tuned teacher on its own training pairs."""
    from ..modelio import load_model

    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(spec["train"])
    set_seed(tcfg.seed)
    teacher, tmeta = load_model(teacher_dir)
    if tmeta["kind"] != "latent-diffusion":
        raise ValueError(f"LCM distils a fine-tuned latent diffusion teacher; {teacher_dir} holds a {tmeta['kind']} model")
    subset = read_subset(subset_path)
    cache, cmeta = read_latent_cache(latents_path, sha256_file(subset_path))
    bb = load_backbone(tmeta["backbone"], backbone_provider(tmeta["backbone"]), with_unet=False)
    settings = {**LCM_DEFAULTS, **dict(spec.get("lcm", {}))}
    student = lcm_student(teacher, settings["time_cond_proj_dim"])
    if spec.get("gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
    objective = LCMObjective(student, teacher, bb.scheduler, cmeta["scaling_factor"],
                             PromptTable(cache[PROMPTS], cache[EMPTY]), settings, accelerator.device, autocast)
    meta = dict(_text_meta("latent-consistency", tmeta["backbone"], student, subset, tmeta["prompts"]), lcm=settings)
    log.info("LCM: %d student parameters, %s, %d processes", count_parameters(student),
             ", ".join(f"{k}={v}" for k, v in settings.items()), accelerator.num_processes)
    fingerprint = json.dumps({"teacher": sha256_file(Path(teacher_dir) / "model.safetensors"), "lcm": settings,
                              "subset": sha256_file(subset_path), "snapshots": spec.get("snapshots", [])},
                             sort_keys=True)
    snapshots = model_snapshots(spec.get("snapshots"), checkpoint_dir, out_dir, meta, "lcm")
    ema, stats = train(objective, cache[POSTERIORS], subset.expanded_indices(), tcfg, accelerator, checkpoint_dir,
                       fingerprint, snapshots, metrics_log, labels=torch.arange(len(subset)))
    stats.update(parameters=count_parameters(student), teacher=str(teacher_dir), method="lcm", lcm=settings)
    if accelerator.is_main_process:
        publish_snapshots(snapshots, out_dir)
        save_model(out_dir, ema, meta, stats)
    accelerator.end_training()
    return stats
