"""Discrete consistency distillation (Song et al. 2023, Algorithm 2) from an EDM teacher.

For x from the training set, n ~ U{1..N-1} and z ~ N(0, I): x_{n+1} = x + t_{n+1} z, one teacher
ODE step (Heun, or Euler) gives x_n, and the loss is d(f_theta(x_{n+1}, t_{n+1}), f_theta-(x_n, t_n)),
with uniform weighting over n (scripts/launch.sh `--weight_schedule uniform`; the CIFAR-10 config
`weighting="uniform"`). theta- is a stop-gradient EMA of theta with rate mu: mu = 0, the online
weights themselves, in the CIFAR-10 reference (consistency_models_cifar10 jcm/losses.py: no target
params for the "consistency" loss, so `target_params = params` under stop_gradient); mu = 0.95 for
ImageNet-64 and LSUN (openai/consistency_models scripts/launch.sh `--target_ema_mode fixed
--start_ema 0.95`).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..diffusion import RHO, ConsistencyFunction, conditioned, euler_step, heun_step, karras_sigmas
from ..diffusion.noise import BatchNoise
from ..io import images_to_unit
from ..modelio import model_meta
from ..nets import build_net, class_labels, count_parameters, inherit_parameters, num_classes
from ..train import TrainConfig, ema_update
from .distances import get_distance
from .run import has_dropout, load_edm_teacher, train_student

log = logging.getLogger(__name__)

SOLVERS = {"heun": heun_step, "euler": euler_step}


@contextlib.contextmanager
def replayed_rng(device: torch.device):
    """Run the block, then rewind the global RNG of the CPU and of `device` to where it started.

    Dropout draws its masks from these generators, so the next forward pass sees the same masks.
    The PyTorch reference saves only th.get_rng_state() (the CPU generator), which leaves CUDA
    dropout masks different; the JAX reference passes one dropout_rng to both calls.
    """
    cpu = torch.get_rng_state()
    dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if dev is not None:
            torch.cuda.set_rng_state(dev, device)


def cd_loss(student, target, teacher, x, sigmas: torch.Tensor, distance, noise=None, solver=heun_step,
            shared_dropout: bool = False, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample consistency distillation loss on clean images x.

    sigmas: ascending grid t_1 = sigma_min < ... < t_N = sigma_max (Song et al.'s indexing).
    shared_dropout: the target's forward pass reuses the online pass's dropout masks (both in train
    mode), so online and target differ by their weights and inputs only, as in the reference code.
    labels: each image's class for class-conditional models; teacher, student and target all see it
    (openai/consistency_models cm/karras_diffusion.py consistency_losses passes model_kwargs["y"] to each).
    """
    student, target, teacher = (conditioned(m, labels) for m in (student, target, teacher))
    noise = BatchNoise.of(noise, x.shape[0], x.device)
    n = noise.randint(sigmas.numel() - 1)
    t_cur, t_next = sigmas[n].to(x.dtype), sigmas[n + 1].to(x.dtype)
    z = noise.randn(x.shape[1:], dtype=x.dtype)
    x_next = x + t_next.reshape(-1, 1, 1, 1) * z
    with torch.no_grad():
        x_cur = solver(teacher, x_next, t_next, t_cur)
    with replayed_rng(x.device) if shared_dropout else contextlib.nullcontext():
        online = student(x_next, t_next)
    with torch.no_grad():
        y_target = target(x_cur, t_cur)
    return distance(online, y_target)


class ConsistencyDistillation:
    def __init__(self, student: ConsistencyFunction, teacher, sigmas: torch.Tensor, distance, target_ema: float,
                 solver: str = "heun"):
        if solver not in SOLVERS:
            raise ValueError(f"unknown teacher solver {solver!r}; available: {sorted(SOLVERS)}")
        self.model = student
        self.teacher = teacher.eval()
        self.sigmas = sigmas
        self.distance = distance
        self.mu = float(target_ema)
        self.solver = SOLVERS[solver]
        # Reference behaviour: with student dropout the target runs in train mode with the same masks
        # (cm/train_util.py CMTrainLoop: target_model.train(); jcm/losses.py: one dropout_rng for both).
        self.shared_dropout = has_dropout(student)
        self.target = copy.deepcopy(student).requires_grad_(False).train(self.shared_dropout)

    def loss(self, model, y, noise, labels=None):
        sigmas = self.sigmas.to(y.device)
        return cd_loss(model, self.target, self.teacher, y, sigmas, self.distance, noise, self.solver,
                       self.shared_dropout, labels)

    def after_step(self, model, step):
        ema_update(self.target, model, self.mu)

    def extra_modules(self):
        return {"target": self.target}


def student_net_config(teacher_net: Mapping[str, Any], student_net: Mapping[str, Any] | None,
                       dropout: float) -> dict:
    """The student's network: the teacher's unless `student_net` names another, with its own dropout.

    The reference distils with student dropout 0 and leaves the teacher's (0.1 or 0.13) unused, the
    teacher running in eval mode (openai/consistency_models scripts/launch.sh `--dropout 0.0
    --teacher_dropout 0.1`; consistency_models_cifar10 configs/cifar10_ve_cd.py `model.dropout = 0.0`).
    """
    cfg = dict(student_net if student_net is not None else teacher_net)
    cfg["dropout"] = float(dropout)
    return cfg


def build_student(teacher, teacher_net: Mapping[str, Any], spec: Mapping[str, Any], resolution: int, channels: int,
                  sigma_data: float, sigma_min: float) -> tuple[ConsistencyFunction, dict, dict]:
    """The student consistency function, initialised from the teacher (every parameter of matching name
    and shape) or at random (App. D.3); returns (student, its net config, the initialisation with its
    inheritance counts)."""
    net_cfg = student_net_config(teacher_net, spec.get("net_config"), spec.get("dropout", 0.0))
    if num_classes(net_cfg) != num_classes(teacher_net):
        raise ValueError(f"the student net is conditioned on {num_classes(net_cfg)} classes, its teacher on "
                         f"{num_classes(teacher_net)} (num_class_embeds; None = unconditional): they must agree")
    net = build_net(net_cfg, resolution, channels)
    init = spec.get("init", "teacher")
    if init == "teacher":
        counts = inherit_parameters(net, teacher.net)
    elif init == "random":
        total = count_parameters(net)
        counts = {"inherited_parameters": 0, "parameters": total, "inherited_tensors": 0,
                  "tensors": len(net.state_dict())}
    else:
        raise ValueError(f"unknown student initialisation {init!r}; available: teacher, random")
    return ConsistencyFunction(net, sigma_data, sigma_min).requires_grad_(True).train(), net_cfg, {"init": init, **counts}


def distill_cd(subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: Mapping[str, Any],
               checkpoint_dir: str | Path | None = None, metrics_log: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(cfg["train"])
    set_seed(tcfg.seed)  # a random or partly random student's initial weights come from the config's seed
    teacher, tmeta = load_edm_teacher(teacher_dir, accelerator.device, "consistency distillation")
    if "target_ema" not in cfg:
        raise ValueError("consistency distillation needs `target_ema` (0 for CIFAR-10, 0.95 for ImageNet-64/LSUN)")
    sigma_min, sigma_max = tmeta["sigma_min"], tmeta["sigma_max"]
    student, net_cfg, counts = build_student(teacher, tmeta["net"], cfg, tmeta["resolution"], tmeta["channels"],
                                             tmeta["sigma_data"], sigma_min)
    sigmas = karras_sigmas(cfg["num_scales"], sigma_min, sigma_max, cfg.get("rho", RHO)).flip(0).to(torch.float32)
    metric = cfg.get("metric", "l2")
    distance = get_distance(metric, cfg.get("lpips"))
    if isinstance(distance, torch.nn.Module):
        distance = distance.to(accelerator.device)
    solver = cfg.get("solver", "heun")
    objective = ConsistencyDistillation(student, teacher, sigmas, distance, cfg["target_ema"], solver)
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    labels = class_labels(net_cfg, subset.labels, str(subset_path))
    log.info("consistency distillation: N=%d, %s teacher steps, metric=%s, target EMA %.4f, student dropout %.3f "
             "(shared masks: %s), %d parameters", cfg["num_scales"], solver, metric, objective.mu,
             net_cfg["dropout"], objective.shared_dropout, count_parameters(student))
    log.info("student initialisation %s: inherited %d of %d parameters (%d of %d tensors) from the teacher",
             counts["init"], counts["inherited_parameters"], counts["parameters"],
             counts["inherited_tensors"], counts["tensors"])
    meta = model_meta("consistency", net_cfg, tmeta["resolution"], tmeta["channels"], tmeta["sigma_data"],
                      sigma_min, sigma_max, teacher=str(teacher_dir))
    stats = train_student(objective, images, subset.expanded_indices(), tcfg, accelerator, cfg, subset_path, teacher_dir,
                          out_dir, meta, "cd", checkpoint_dir, metrics_log, labels, num_classes=num_classes(net_cfg),
                          num_scales=cfg["num_scales"], metric=metric, solver=solver, target_ema=objective.mu,
                          student_dropout=net_cfg["dropout"], **counts)
    return stats
