"""Stage 2: train an EDM teacher on a subset (no augmentation: the study forbids it)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .data import read_subset
from .diffusion import EDMDenoiser
from .diffusion.loss import EDMLoss
from .io import images_to_unit, sha256_file
from .modelio import model_meta, model_snapshots, save_model
from .nets import build_net, class_labels, count_parameters, num_classes
from .train import TrainConfig, publish_snapshots, train

log = logging.getLogger(__name__)


class EDMObjective:
    """Denoising score matching with EDM's preconditioning, sigma distribution and loss weight."""

    def __init__(self, model: EDMDenoiser, loss: EDMLoss):
        self.model = model
        self.edm_loss = loss

    def loss(self, model, y, noise, labels=None):
        return self.edm_loss(model, y, noise, labels)

    def after_step(self, model, step):
        pass

    def extra_modules(self):
        return {}


def train_teacher(subset_path: str | Path, out_dir: str | Path, cfg: Mapping[str, Any], net_cfg: Mapping[str, Any],
                  checkpoint_dir: str | Path | None = None, metrics_log: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(cfg["train"])
    set_seed(tcfg.seed)  # the initial weights come from the config's seed, like everything after them
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    _, channels, resolution, _ = images.shape
    edm = cfg.get("edm", {})
    sigma_data = edm.get("sigma_data", 0.5)
    model = EDMDenoiser(build_net(net_cfg, resolution, channels), sigma_data)
    objective = EDMObjective(model, EDMLoss(edm.get("p_mean", -1.2), edm.get("p_std", 1.2), sigma_data))
    labels = class_labels(net_cfg, subset.labels, str(subset_path))
    log.info("teacher: %d unique images (%d with repeats), %d parameters, %s, %d processes",
             len(subset), len(subset.expanded_indices()), count_parameters(model),
             "unconditional" if labels is None else f"conditioned on {num_classes(net_cfg)} classes",
             accelerator.num_processes)
    fingerprint = json.dumps({"net": net_cfg, "edm": cfg.get("edm", {}), "snapshots": cfg.get("snapshots", []),
                              "subset": sha256_file(subset_path)}, sort_keys=True)
    meta = model_meta("edm", net_cfg, resolution, channels, sigma_data,
                      edm.get("sigma_min", 0.002), edm.get("sigma_max", 80.0))
    snapshots = model_snapshots(cfg.get("snapshots"), checkpoint_dir, out_dir, meta, "edm")
    ema, stats = train(objective, images, subset.expanded_indices(), tcfg, accelerator, checkpoint_dir, fingerprint,
                       snapshots, metrics_log, labels)
    stats.update(parameters=count_parameters(model), subset=str(subset_path), unique_images=len(subset),
                 num_classes=num_classes(net_cfg))
    if accelerator.is_main_process:
        publish_snapshots(snapshots, out_dir)
        save_model(out_dir, ema, meta, stats)
    accelerator.end_training()
    return stats
