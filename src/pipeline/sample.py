"""Stage 4: generate samples into fixed-size Parquet shards.

Sample i's noise comes from its own generator, seeded from (run seed, i), and is drawn on the CPU
before moving to the device: shard k of N samples holds the same images whether one GPU wrote all
shards or many GPUs wrote one each, and whatever the batch size. A class-conditional model's sample i
is generated for a class drawn uniformly from a stream of its own (run seed, i, LABEL_STREAM), as
NVlabs/edm generate.py draws a random class per seed, and the shard's `label` column records it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import EDM_SAMPLERS
from .diffusion import RHO, conditioned, consistency_sample, edm_sample, euler_sample, karras_sigmas, refine_sample
from .diffusion.solvers import heun_nfe
from .io import unit_to_images, write_image_table
from .shards import shard_range
from .data.subsets import PROMPT
from .modelio import TEXT2IMAGE_KINDS, load_model
from .nets import class_labels, num_classes

log = logging.getLogger(__name__)


LABEL_STREAM = 1  # third entropy word of a sample's class draw: a stream apart from its noise seed (run seed, i)


def sample_labels(run_seed: int, indices: Sequence[int], classes: int) -> np.ndarray:
    """The class of each sample index, uniform over [0, classes), from (run seed, index) alone."""
    if classes < 1:
        raise ValueError(f"a class-conditional model needs at least one class, got {classes}")
    return np.asarray([np.random.default_rng([int(run_seed), int(i), LABEL_STREAM]).integers(classes)
                       for i in indices], dtype=np.int64)


def sample_seed(run_seed: int, index: int) -> int:
    """A 63-bit seed for sample `index`, independent of every other sample's."""
    state = np.random.SeedSequence([int(run_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class NoiseStream:
    """Per-sample Gaussian noise: call k returns draw k of every sample, draw k of sample j from seeds[j] alone.

    Drawn on the CPU, one generator per sample, so a sample's noise does not depend on the batch it is
    in or the device; streamed, so a 256-step stochastic sampler never holds all its draws at once.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        self.shape = tuple(shape)
        self.device = device

    def __call__(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def sample_noise(seeds: Sequence[int], draws: int, shape: Sequence[int]) -> list[torch.Tensor]:
    """`draws` noise tensors of shape (len(seeds), *shape): draw k of sample j uses only seeds[j]."""
    stream = NoiseStream(seeds, shape)
    return [stream() for _ in range(draws)]


def consistency_ts(sampler: Mapping[str, Any], sigma_min: float, sigma_max: float) -> list[float]:
    """The noise levels of a multistep consistency sampler, given directly (`ts`) or, as the reference
    code gives them, as indices into a `grid_steps`-level Karras grid (`ts_index`; index 0 = sigma_max).

    openai/consistency_models scripts/launch.sh samples ImageNet-64 CD with steps=40, ts=0,22,39, and the
    CIFAR-10 reference's two-step notebook (consistency_models_cifar10 editing_multistep_sampling.ipynb)
    with train_N=18, ts=[0, 11, 17]; the last index is sigma_min, where f(x, sigma_min) = x adds nothing,
    so here it is left out: [0, 11] of 18 levels is sigma = 80 then 0.585.
    """
    if "ts" in sampler:
        return [float(t) for t in sampler["ts"]]
    grid = karras_sigmas(sampler["grid_steps"], sigma_min, sigma_max, sampler.get("rho", RHO))
    return [float(grid[i]) for i in sampler["ts_index"]]


def sampler_nfe(sampler: Mapping[str, Any]) -> int:
    """Network evaluations per sample; a refine sampler's spec carries its base sampler inline (`base_spec`)."""
    if sampler["kind"] in EDM_SAMPLERS:
        return heun_nfe(sampler["steps"])
    if sampler["kind"] == "euler":
        return int(sampler["steps"])
    if sampler["kind"] == "refine":
        return sampler_nfe(sampler["base_spec"]) + heun_nfe(sampler["steps"])
    if sampler["kind"] == "lcm":  # guidance is an input of the student: one UNet call per step
        return int(sampler["steps"])
    if sampler["kind"] == "diffusion":  # classifier-free guidance calls the UNet with and without the prompt
        return int(sampler["steps"]) * (2 if sampler.get("guidance_scale", 7.5) > 1 else 1)
    return len(sampler["ts"] if "ts" in sampler else sampler["ts_index"])


def generate(model, meta: Mapping[str, Any], sampler: Mapping[str, Any], seeds: Sequence[int],
             device: torch.device | str = "cpu", labels: Sequence[int] | None = None,
             teacher: tuple[torch.nn.Module, Mapping[str, Any]] | None = None) -> np.ndarray:
    """Generate one image per seed with the named sampler; returns uint8 NHWC. A class-conditional
    model needs `labels`, the class of each image; an unconditional one takes none. A refine sampler
    needs the student's `teacher` (model, meta): it refines the base sampler's output, drawing its
    perturbation from each sample's stream after the base sampler's draws."""
    shape = (meta["channels"], meta["resolution"], meta["resolution"])
    kind = sampler["kind"]
    classes = num_classes(meta["net"])
    if (classes is None) != (labels is None):
        raise ValueError("a class-conditional model needs one label per sample" if labels is None
                         else "labels were given to an unconditional model")
    if labels is not None:
        labels = class_labels(meta["net"], labels, "the requested samples").to(device)
        if len(labels) != len(seeds):
            raise ValueError(f"{len(labels)} labels for {len(seeds)} samples")
    noise = NoiseStream(seeds, shape, device)
    if kind == "refine":
        if teacher is None:
            raise ValueError("a refine sampler needs the student's teacher")
        x0 = _sample(conditioned(model, labels), meta, sampler["base_spec"], noise)
        t_model, t_meta = teacher
        x = refine_sample(conditioned(t_model, labels), x0.clamp(-1, 1), noise(), sampler["sigma"], sampler["steps"],
                          t_meta["sigma_min"], sampler.get("rho", RHO))
    else:
        x = _sample(conditioned(model, labels), meta, sampler, noise)
    return unit_to_images(x.float().cpu().numpy())


def _sample(model, meta: Mapping[str, Any], sampler: Mapping[str, Any], noise: "NoiseStream") -> torch.Tensor:
    kind = sampler["kind"]
    if kind in EDM_SAMPLERS:
        if meta["kind"] != "edm":
            raise ValueError(f"the {kind} sampler needs an EDM denoiser, got a {meta['kind']} model")
        churn = {k: sampler[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in sampler} if kind == "stochastic" else {}
        x = edm_sample(model, noise(), sampler["steps"], meta["sigma_min"], meta["sigma_max"], sampler.get("rho", RHO),
                       churn_noise=noise, **churn)
    elif kind == "consistency":
        if meta["kind"] != "consistency":
            raise ValueError(f"the consistency sampler needs a consistency model, got a {meta['kind']} model")
        ts = consistency_ts(sampler, meta["sigma_min"], meta["sigma_max"])
        x = consistency_sample(model, [noise() for _ in ts], ts, meta["sigma_min"], sampler.get("clip_denoised", True))
    elif kind == "euler":
        if meta["kind"] != "edm":
            raise ValueError(f"the euler sampler needs an EDM denoiser, got a {meta['kind']} model")
        x = euler_sample(model, noise(), sampler["steps"], meta["sigma_min"], meta["sigma_max"], sampler.get("rho", RHO),
                         sampler.get("denoise", False))
    else:
        raise ValueError(f"unknown sampler kind {kind!r}")
    return x


def write_shard(model_dir: str | Path, out_path: str | Path, sampler_name: str, sampler: Mapping[str, Any],
                shard: int, shard_size: int, num_samples: int, run_seed: int, model_id: str,
                batch_size: int = 256, device: str | None = None, teacher_dir: str | Path | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(model_dir, device)
    teacher = None
    if sampler["kind"] == "refine":
        if teacher_dir is None:
            raise ValueError(f"the refine sampler {sampler_name!r} needs the student's teacher (--teacher)")
        teacher = load_model(teacher_dir, device)
        if teacher[1]["kind"] != "edm":
            raise ValueError(f"{teacher_dir} is a {teacher[1]['kind']} model; refining needs an EDM teacher")
    indices = list(shard_range(shard, shard_size, num_samples))
    seeds = [sample_seed(run_seed, i) for i in indices]
    desc = f"sample {model_id}/{sampler_name} shard {shard}"
    text = {}
    if meta["kind"] in TEXT2IMAGE_KINDS:
        from .text2image.generate import sample_text2image

        classes, labels = None, None
        images, prompts, groups = sample_text2image(model, meta, sampler, indices, seeds, batch_size, device, desc)
        text = {PROMPT: prompts, "prompt_group": groups}
    else:
        classes = num_classes(meta["net"])
        labels = None if classes is None else sample_labels(run_seed, indices, classes)
        images = np.concatenate([
            generate(model, meta, sampler, seeds[lo:lo + batch_size], device,
                     None if labels is None else labels[lo:lo + batch_size], teacher)
            for lo in tqdm(range(0, len(seeds), batch_size), desc=desc, mininterval=5)])
    n = len(indices)
    nfe = sampler_nfe(sampler)
    write_image_table(out_path, images, {
        "sample_id": np.asarray(indices, dtype=np.int64),
        "seed": np.asarray(seeds, dtype=np.int64),
        "label": np.full(n, -1, dtype=np.int64) if labels is None else labels,  # -1: unconditional
        "model": [model_id] * n,
        "sampler": [sampler_name] * n,
        "nfe": np.full(n, nfe, dtype=np.int64),
        **text,
    }, {"model": model_id, "sampler": sampler_name, "run_seed": run_seed, "shard": shard,
        "num_classes": classes if classes is not None else 0})
    log.info("wrote %d samples (%d NFE each) to %s", n, nfe, out_path)
    return n
