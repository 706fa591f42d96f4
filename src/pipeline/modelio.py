"""Model directories between stages: safetensors weights + a JSON that says how to rebuild the network.

Weights are never unpickled: safetensors holds tensors only, and the architecture is rebuilt from
the JSON through `nets.build_net`, so a model directory is safe to load from anywhere.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from .diffusion import ConsistencyFunction, EDMDenoiser
from .io import atomic_output, write_json
from .nets import build_net
from .train import Snapshots

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATS = "stats.json"
# Text-to-image models: a fine-tuned (latent-diffusion) or LCM-distilled (latent-consistency) UNet whose
# config.json names the backbone folder that supplies its tokenizer, text encoder, VAE and noise schedule.
TEXT2IMAGE_KINDS = ("latent-diffusion", "latent-consistency")


def model_meta(kind: str, net_cfg: Mapping[str, Any], resolution: int, channels: int,
               sigma_data: float, sigma_min: float, sigma_max: float, **extra) -> dict:
    if kind not in ("edm", "consistency"):
        raise ValueError(f"unknown model kind {kind!r}")
    return dict(kind=kind, net=dict(net_cfg), resolution=resolution, channels=channels,
                sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max, **extra)


def build_model(meta: Mapping[str, Any]) -> torch.nn.Module:
    if meta["kind"] in TEXT2IMAGE_KINDS:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(meta["unet"])
    net = build_net(meta["net"], meta["resolution"], meta["channels"])
    if meta["kind"] == "edm":
        return EDMDenoiser(net, meta["sigma_data"])
    return ConsistencyFunction(net, meta["sigma_data"], meta["sigma_min"])


def save_model(out_dir: str | Path, model: torch.nn.Module, meta: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    """Write weights, config and stats; the weights go last-but-one and stats last, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_output(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CONFIG, dict(meta))
    write_json(out_dir / STATS, dict(stats))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from its directory; a missing file names the rule that writes it."""
    model_dir = Path(model_dir)
    for name in (WEIGHTS, CONFIG):
        if not (model_dir / name).exists():
            raise FileNotFoundError(
                f"{model_dir / name} is missing: it is written by the train_teacher or distill rule "
                f"(snakemake {model_dir / name})")
    meta = json.loads((model_dir / CONFIG).read_text())
    model = build_model(meta)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS), device="cpu"))
    return model.to(device).eval().requires_grad_(False), meta


def model_snapshots(steps, checkpoint_dir: str | Path | None, out_dir: str | Path, meta: Mapping[str, Any],
                    method: str) -> Snapshots | None:
    """Snapshots of a training run as model directories (same files as the final model, plus the step).

    They collect beside the checkpoint, so a retried job keeps what it wrote, or in the output
    directory when the run keeps no checkpoint.
    """
    if not steps:
        return None
    root = Path(checkpoint_dir) / "snapshots" if checkpoint_dir else Path(out_dir) / "snapshots"
    return Snapshots(steps, root, lambda d, m, k: save_model(d, m, dict(meta, step=k),
                                                                   {"step": k, "steps": k, "method": method}))


def export_snapshot(run_dir: str | Path, step: int, out_dir: str | Path) -> dict:
    """Check the snapshot at `step` of a training run's snapshots/ directory and copy it to `out_dir`.

    It must load as a model and say it is the step asked for; the copy goes file by file through
    atomic writes, weights before config and stats as in save_model.
    """
    src = Path(run_dir) / f"step-{int(step)}"
    if not (src / WEIGHTS).exists():
        raise FileNotFoundError(f"{src / WEIGHTS} is missing: is {int(step)} among the run's `snapshots` steps? "
                                f"The train_teacher or distill rule writes {run_dir}")
    _, meta = load_model(src)
    if meta.get("step") != int(step):
        raise ValueError(f"{src} holds the snapshot of step {meta.get('step')}, not {int(step)}")
    out_dir = Path(out_dir)
    for name in (WEIGHTS, CONFIG, STATS):
        with atomic_output(out_dir / name) as tmp:
            shutil.copyfile(src / name, tmp)
    return meta
