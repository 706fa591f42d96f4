"""Stage 4: generate samples into fixed-size Parquet shards.

Sample i's noise comes from its own generator, seeded from (run seed, i), and is drawn on the CPU
before moving to the device: shard k of N samples holds the same images whether one GPU wrote all
shards or many GPUs wrote one each, and whatever the batch size.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion import consistency_sample, heun_sample
from .diffusion.solvers import heun_nfe
from .io import unit_to_images, write_image_table
from .shards import shard_range
from .modelio import load_model

log = logging.getLogger(__name__)


def sample_seed(run_seed: int, index: int) -> int:
    """A 63-bit seed for sample `index`, independent of every other sample's."""
    state = np.random.SeedSequence([int(run_seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def sample_noise(seeds: Sequence[int], draws: int, shape: Sequence[int]) -> list[torch.Tensor]:
    """`draws` noise tensors of shape (len(seeds), *shape): draw k of sample j uses only seeds[j]."""
    per_sample = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        per_sample.append([torch.randn(tuple(shape), generator=g) for _ in range(draws)])
    return [torch.stack([p[k] for p in per_sample]) for k in range(draws)]


def sampler_nfe(sampler: Mapping[str, Any]) -> int:
    return heun_nfe(sampler["steps"]) if sampler["kind"] == "heun" else len(sampler["ts"])


def generate(model, meta: Mapping[str, Any], sampler: Mapping[str, Any], seeds: Sequence[int],
             device: torch.device | str = "cpu") -> np.ndarray:
    """Generate one image per seed with the named sampler; returns uint8 NHWC."""
    shape = (meta["channels"], meta["resolution"], meta["resolution"])
    kind = sampler["kind"]
    if kind == "heun":
        if meta["kind"] != "edm":
            raise ValueError(f"the heun sampler needs an EDM denoiser, got a {meta['kind']} model")
        (noise,) = sample_noise(seeds, 1, shape)
        x = heun_sample(model, noise.to(device), sampler["steps"], meta["sigma_min"], meta["sigma_max"],
                        sampler.get("rho", 7.0))
    elif kind == "consistency":
        if meta["kind"] != "consistency":
            raise ValueError(f"the consistency sampler needs a consistency model, got a {meta['kind']} model")
        noises = [n.to(device) for n in sample_noise(seeds, len(sampler["ts"]), shape)]
        x = consistency_sample(model, noises, sampler["ts"], meta["sigma_min"])
    else:
        raise ValueError(f"unknown sampler kind {kind!r}")
    return unit_to_images(x.float().cpu().numpy())


def write_shard(model_dir: str | Path, out_path: str | Path, sampler_name: str, sampler: Mapping[str, Any],
                shard: int, shard_size: int, num_samples: int, run_seed: int, model_id: str,
                batch_size: int = 256, device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(model_dir, device)
    indices = list(shard_range(shard, shard_size, num_samples))
    seeds = [sample_seed(run_seed, i) for i in indices]
    images = []
    for lo in tqdm(range(0, len(seeds), batch_size), desc=f"sample {model_id}/{sampler_name} shard {shard}", mininterval=5):
        images.append(generate(model, meta, sampler, seeds[lo:lo + batch_size], device))
    images = np.concatenate(images)
    n = len(indices)
    nfe = sampler_nfe(sampler)
    write_image_table(out_path, images, {
        "sample_id": np.asarray(indices, dtype=np.int64),
        "seed": np.asarray(seeds, dtype=np.int64),
        "label": np.full(n, -1, dtype=np.int64),  # unconditional models; class-conditional ones fill this
        "model": [model_id] * n,
        "sampler": [sampler_name] * n,
        "nfe": np.full(n, nfe, dtype=np.int64),
    }, {"model": model_id, "sampler": sampler_name, "run_seed": run_seed, "shard": shard})
    log.info("wrote %d samples (%d NFE each) to %s", n, nfe, out_path)
    return n
