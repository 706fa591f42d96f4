"""Model directories between stages: safetensors weights + a JSON that says how to rebuild the network.

Weights are never unpickled: safetensors holds tensors only, and the architecture is rebuilt from
the JSON through `nets.build_net`, so a model directory is safe to load from anywhere. torch is
imported where a network is built or saved, so exporting a snapshot (a checked copy) starts without it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .io import atomic_output, write_json

if TYPE_CHECKING:
    import torch

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
    from .diffusion import ConsistencyFunction, EDMDenoiser
    from .nets import build_net

    if meta["kind"] in TEXT2IMAGE_KINDS:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_config(meta["unet"])
    net = build_net(meta["net"], meta["resolution"], meta["channels"])
    if meta["kind"] == "edm":
        return EDMDenoiser(net, meta["sigma_data"])
    return ConsistencyFunction(net, meta["sigma_data"], meta["sigma_min"])


def save_model(out_dir: str | Path, model: torch.nn.Module, meta: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
    """Write weights, config and stats; the weights go last-but-one and stats last, each atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_output(out_dir / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out_dir / CONFIG, dict(meta))
    write_json(out_dir / STATS, dict(stats))


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a model from its directory; a missing file names the rule that writes it."""
    from safetensors.torch import load_file

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
    from .train import Snapshots

    if not steps:
        return None
    root = Path(checkpoint_dir) / "snapshots" if checkpoint_dir else Path(out_dir) / "snapshots"
    return Snapshots(steps, root, lambda d, m, k: save_model(d, m, dict(meta, step=k),
                                                                   {"step": k, "steps": k, "method": method}))


def export_snapshot(run_dir: str | Path, step: int, out_dir: str | Path) -> dict:
    """Check the snapshot at `step` of a training run's snapshots/ directory and copy it to `out_dir`.

    Its weights must read as a safetensors file whose tensors match the run's final weights in names
    and shapes, and its config must say it is the step asked for; the copy goes file by file through
    atomic writes, weights before config and stats as in save_model. (Sampling then loads it strictly.)
    """
    from safetensors import safe_open

    src = Path(run_dir) / f"step-{int(step)}"
    if not (src / WEIGHTS).exists():
        raise FileNotFoundError(f"{src / WEIGHTS} is missing: is {int(step)} among the run's `snapshots` steps? "
                                f"The train_teacher or distill rule writes {run_dir}")
    meta = json.loads((src / CONFIG).read_text())
    if meta.get("step") != int(step):
        raise ValueError(f"{src} holds the snapshot of step {meta.get('step')}, not {int(step)}")

    def shapes(path: Path) -> dict:
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    final = Path(run_dir).parent / WEIGHTS
    if final.exists() and shapes(src / WEIGHTS) != shapes(final):
        raise ValueError(f"{src / WEIGHTS} does not hold the tensors of the run's model {final} (names or shapes differ)")
    out_dir = Path(out_dir)
    for name in (WEIGHTS, CONFIG, STATS):
        with atomic_output(out_dir / name) as tmp:
            shutil.copyfile(src / name, tmp)
    return meta
