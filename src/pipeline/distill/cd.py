"""Discrete consistency distillation (Song et al. 2023, Algorithm 2) from an EDM teacher.

For x from the training set, n ~ U{1..N-1} and z ~ N(0, I): x_{n+1} = x + t_{n+1} z, one teacher
Heun step gives x_n, and the loss is d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x_n, t_n)), where
theta- is a stop-gradient EMA of theta (rate mu; mu = 0 uses the online weights).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..diffusion import ConsistencyFunction, heun_step, karras_sigmas
from ..io import images_to_unit, sha256_file
from ..modelio import load_model, model_meta, save_model
from ..nets import count_parameters
from ..train import TrainConfig, ema_update, train
from .distances import get_distance

log = logging.getLogger(__name__)


def cd_loss(student, target, teacher, x, sigmas: torch.Tensor, distance, generator=None) -> torch.Tensor:
    """Per-sample consistency distillation loss on clean images x.

    sigmas: ascending grid t_1 = sigma_min < ... < t_N = sigma_max (Song et al.'s indexing).
    """
    n_levels = sigmas.numel()
    n = torch.randint(0, n_levels - 1, (x.shape[0],), device=x.device, generator=generator)
    t_cur, t_next = sigmas[n].to(x.dtype), sigmas[n + 1].to(x.dtype)
    z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    x_next = x + t_next.reshape(-1, 1, 1, 1) * z
    with torch.no_grad():
        x_cur = heun_step(teacher, x_next, t_next, t_cur)
        y_target = target(x_cur, t_cur)
    return distance(student(x_next, t_next), y_target)


class ConsistencyDistillation:
    def __init__(self, student: ConsistencyFunction, teacher, sigmas: torch.Tensor, distance, target_ema: float):
        self.model = student
        self.teacher = teacher
        self.target = copy.deepcopy(student).requires_grad_(False).eval()
        self.sigmas = sigmas
        self.distance = distance
        self.mu = float(target_ema)

    def loss(self, model, y, generator):
        sigmas = self.sigmas.to(y.device)
        return cd_loss(model, self.target, self.teacher, y, sigmas, self.distance, generator)

    def after_step(self, model, step):
        ema_update(self.target, model, self.mu)

    def extra_modules(self):
        return {"target": self.target}


def distill_cd(subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: Mapping[str, Any],
               checkpoint_dir: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(cfg["train"])
    set_seed(tcfg.seed)
    teacher, tmeta = load_model(teacher_dir, accelerator.device)
    if tmeta["kind"] != "edm":
        raise ValueError(f"{teacher_dir} is a {tmeta['kind']} model; consistency distillation needs an EDM teacher")
    sigma_min, sigma_max = tmeta["sigma_min"], tmeta["sigma_max"]
    student = ConsistencyFunction(copy.deepcopy(teacher.net), tmeta["sigma_data"], sigma_min).requires_grad_(True).train()
    sigmas = karras_sigmas(cfg["num_scales"], sigma_min, sigma_max, cfg.get("rho", 7.0)).flip(0).to(torch.float32)
    objective = ConsistencyDistillation(student, teacher, sigmas, get_distance(cfg.get("metric", "l2")),
                                        cfg.get("target_ema", 0.95))
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    log.info("consistency distillation: N=%d, metric=%s, target EMA %.4f, %d parameters",
             cfg["num_scales"], cfg.get("metric", "l2"), objective.mu, count_parameters(student))
    fingerprint = json.dumps({"spec": {k: v for k, v in cfg.items() if k != "train"}, "subset": sha256_file(subset_path),
                              "teacher": sha256_file(Path(teacher_dir) / "model.safetensors")}, sort_keys=True)
    ema, stats = train(objective, images, subset.expanded_indices(), tcfg, accelerator, checkpoint_dir, fingerprint)
    stats.update(method="cd", teacher=str(teacher_dir), num_scales=cfg["num_scales"], metric=cfg.get("metric", "l2"),
                 target_ema=objective.mu, parameters=count_parameters(student))
    if accelerator.is_main_process:
        meta = model_meta("consistency", tmeta["net"], tmeta["resolution"], tmeta["channels"], tmeta["sigma_data"],
                          sigma_min, sigma_max, teacher=str(teacher_dir))
        save_model(out_dir, ema, meta, stats)
    accelerator.end_training()
    return stats
