"""Continuous-time consistency distillation (Song et al. 2023, Sec. 6 and App. B.2; the study's App. A.2).

The limit N -> infinity of discrete CD: instead of comparing the student at two neighbouring levels
joined by one teacher step, the loss reads the student's rate of change along the teacher's PF-ODE,
a Jacobian-vector product. As consistency_models_cifar10 runs it (jcm/losses.py
get_continuous_consistency_loss_fn, configs/cifar10_ve_continuous.py):

- t = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho, u ~ U[0, 1) (the Heun
  sampler's spacing), x_t = x + t z, weighting 1;
- the teacher's score s = (D(x_t, t) - x_t) / t^2; along the PF-ODE dx/dt = -t s, so going down in t
  moves (x, t) along (t s, -1), and diffs = J_f (t s, -1) is the student's change per unit of t;
- `stopgrad: false` (the reference CIFAR-10 config): loss = ||diffs||_2 per sample, differentiated
  through the JVP; `stopgrad: true`: the pseudo-loss -stopgrad(diffs) . f(x_t, t), whose gradient is
  what discrete CD's (with the online weights as target) tends to, divided by 2 dt / d, as dt -> 0.

The JVP is torch.func.jvp (forward-mode AD) through the whole student, preconditioning included.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..diffusion import RHO, conditioned
from ..diffusion.noise import BatchNoise
from ..io import images_to_unit
from ..modelio import model_meta
from ..nets import class_labels, count_parameters, num_classes
from ..train import TrainConfig
from .cd import build_student
from .run import load_edm_teacher, train_student

log = logging.getLogger(__name__)


def continuous_cd_loss(student, teacher, x: torch.Tensor, sigma_min: float, sigma_max: float, rho: float,
                       noise=None, stopgrad: bool = False, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample continuous-time CD loss on clean images x (see the module docstring)."""
    student, teacher = conditioned(student, labels), conditioned(teacher, labels)
    noise = BatchNoise.of(noise, x.shape[0], x.device)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    t = (lo + noise.rand(dtype=x.dtype) * (hi - lo)) ** rho
    col = t.reshape(-1, *([1] * (x.ndim - 1)))
    x_t = x + col * noise.randn(x.shape[1:], dtype=x.dtype)
    with torch.no_grad():
        score = (teacher(x_t, t) - x_t) / col ** 2
    f_t, diffs = torch.func.jvp(student, (x_t, t), (col * score, -torch.ones_like(t)))
    if stopgrad:
        return -(diffs.detach() * f_t).flatten(1).sum(1)
    return diffs.flatten(1).pow(2).sum(1).sqrt()


class ContinuousConsistencyDistillation:
    def __init__(self, student, teacher, sigma_min: float, sigma_max: float, rho: float, stopgrad: bool):
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.grid = (float(sigma_min), float(sigma_max), float(rho))
        self.stopgrad = bool(stopgrad)

    def loss(self, model, y, noise, labels=None):
        return continuous_cd_loss(model, self.teacher, y, *self.grid, noise, self.stopgrad, labels)

    def after_step(self, model, step):
        pass

    def extra_modules(self):
        return {}


def distill_cd_continuous(subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path,
                          cfg: Mapping[str, Any], checkpoint_dir: str | Path | None = None,
                          metrics_log: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(cfg["train"])
    set_seed(tcfg.seed)
    teacher, tmeta = load_edm_teacher(teacher_dir, accelerator.device, "consistency distillation")
    sigma_min, sigma_max = tmeta["sigma_min"], tmeta["sigma_max"]
    student, net_cfg, counts = build_student(teacher, tmeta["net"], cfg, tmeta["resolution"], tmeta["channels"],
                                             tmeta["sigma_data"], sigma_min)
    stopgrad = bool(cfg.get("stopgrad", False))
    objective = ContinuousConsistencyDistillation(student, teacher, sigma_min, sigma_max, cfg.get("rho", RHO), stopgrad)
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    labels = class_labels(net_cfg, subset.labels, str(subset_path))
    log.info("continuous-time consistency distillation: stopgrad %s, student dropout %.3f, %d parameters",
             stopgrad, net_cfg["dropout"], count_parameters(student))
    meta = model_meta("consistency", net_cfg, tmeta["resolution"], tmeta["channels"], tmeta["sigma_data"],
                      sigma_min, sigma_max, teacher=str(teacher_dir))
    stats = train_student(objective, images, subset.expanded_indices(), tcfg, accelerator, cfg, subset_path, teacher_dir,
                          out_dir, meta, "cd-continuous", checkpoint_dir, metrics_log, labels,
                          num_classes=num_classes(net_cfg), stopgrad=stopgrad, student_dropout=net_cfg["dropout"],
                          **counts)
    return stats
