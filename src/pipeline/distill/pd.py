"""Progressive distillation (Salimans & Ho 2022) from an EDM teacher, in EDM's parameterisation.

The study's PD baseline (App. A.1) follows the reference implementation of consistency_models_cifar10
(jcm/losses.py get_progressive_distillation_loss_fn; configs/cifar10_ve_progressive_distillation.py),
the EDM-form port of Salimans & Ho's discrete-time algorithm (google-research diffusion_distillation
dpm.py Model.training_losses):

- a student of N steps samples with N Euler (= DDIM) steps on the Karras grid of N + 1 levels
  (diffusion/solvers.py euler_sample); its level i is u = i/N on sigma(u) = (sigma_max^(1/rho) +
  u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho;
- for i ~ U{0..N-1}, x_t = x + t z at t = sigma(i/N); the teacher takes two Euler steps
  t -> t2 = sigma((i + 1/2)/N) -> t3 = sigma((i + 1)/N), and the target is the denoised image that
  carries one student Euler step from (x_t, t) to the teacher's x_t3: D* = x_t - t (x_t3 - x_t)/(t3 - t);
- the loss is d(D_student(x_t, t), D*) times max(1/t^2, 1) ("truncated_snr"), d the squared
  difference averaged over pixels (`l2`) or LPIPS (the study's default, App. A.1);
- stage k trains a student of N_k = start_scales / 2^k steps, initialised from the previous stage's
  student, which is then its frozen teacher; the first stage's teacher is the EDM teacher itself
  taking 2 start_scales Euler steps. Each stage restarts the optimizer (jcm/train.py: opt_state
  re-initialised and params_ema = params at a stage change) and decays its learning rate linearly to
  0 (`train.lr_decay: linear`); the stages of 2 steps and 1 step run twice as long (jcm/train.py
  doubles linear_decay_steps there). The reference keeps no EMA (`ema_rate = 0.0`) and trains its
  students with dropout 0 (`model.dropout = 0.0`; google's config/cifar_distill.py: "same as teacher
  but with 0 dropout"): each student is the previous model with its dropout layers at p = 0.

Each stage is a run of the shared training loop with its own checkpoints (stage-<N>/ under the
job's checkpoint directory), and its result is saved there before the next stage starts, so a
job stopped in any stage resumes in that stage.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..diffusion import EDMDenoiser, conditioned, euler_step
from ..diffusion.karras import RHO, karras_curve
from ..diffusion.noise import BatchNoise
from ..io import atomic_output, images_to_unit
from ..modelio import load_model, model_meta, save_model
from ..nets import class_labels, count_parameters, num_classes
from ..train import TrainConfig, train
from .distances import get_distance
from .run import NO_DROPOUT, load_edm_teacher, run_fingerprint, without_dropout

log = logging.getLogger(__name__)


def inverted_target(x_t: torch.Tensor, t: torch.Tensor, x_t3: torch.Tensor, t3: torch.Tensor) -> torch.Tensor:
    """The denoised image D* whose Euler step from (x_t, t) to t3 lands on x_t3 (jcm/losses.py
    euler_to_denoiser): x_t3 = x_t + (t3 - t)(x_t - D*)/t solved for D*."""
    shape = (-1, *([1] * (x_t.ndim - 1)))
    t, t3 = t.reshape(shape), t3.reshape(shape)
    return x_t - t * (x_t3 - x_t) / (t3 - t)


def truncated_snr(t: torch.Tensor) -> torch.Tensor:
    """max(1/t^2, 1): PD's weighting in EDM form (jcm/losses.py `truncated_snr`; dpm.py 'snr_trunc')."""
    return torch.clamp(t ** -2, min=1.0)


def pd_loss(student, teacher, x: torch.Tensor, num_steps: int, sigma_min: float, sigma_max: float, rho: float,
            distance, noise=None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss of one PD stage: a student of `num_steps` steps against two teacher Euler steps."""
    student, teacher = conditioned(student, labels), conditioned(teacher, labels)
    noise = BatchNoise.of(noise, x.shape[0], x.device)
    i = noise.randint(num_steps).to(x.dtype)
    t, t2, t3 = (karras_curve((i + k) / num_steps, sigma_min, sigma_max, rho) for k in (0.0, 0.5, 1.0))
    z = noise.randn(x.shape[1:], dtype=x.dtype)
    x_t = x + t.reshape(-1, *([1] * (x.ndim - 1))) * z
    with torch.no_grad():
        x_t3 = euler_step(teacher, euler_step(teacher, x_t, t, t2), t2, t3)
        target = inverted_target(x_t, t, x_t3, t3)
    return distance(student(x_t, t), target) * truncated_snr(t)


class ProgressiveDistillationStage:
    """The objective of one stage for the shared training loop: the teacher is frozen."""

    def __init__(self, student: EDMDenoiser, teacher: EDMDenoiser, num_steps: int, sigma_min: float,
                 sigma_max: float, rho: float, distance):
        self.model = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.num_steps = int(num_steps)
        self.grid = (float(sigma_min), float(sigma_max), float(rho))
        self.distance = distance

    def loss(self, model, y, noise, labels=None):
        return pd_loss(model, self.teacher, y, self.num_steps, *self.grid, self.distance, noise, labels)

    def after_step(self, model, step):
        pass

    def extra_modules(self):
        return {}


def stage_plan(start_scales: int, stage_steps: int, final_stage_steps: int | None = None) -> list[tuple[int, int]]:
    """[(student steps N, optimizer steps)] from start_scales down to 1, halving; the stages of 2 and 1
    steps run `final_stage_steps` (twice stage_steps by default, as jcm/train.py doubles them)."""
    if start_scales < 1 or start_scales & (start_scales - 1):
        raise ValueError(f"start_scales must be a power of 2, got {start_scales}")
    final = 2 * stage_steps if final_stage_steps is None else final_stage_steps
    plan, n = [], start_scales
    while n >= 1:
        plan.append((n, final if n <= 2 else stage_steps))
        n //= 2
    return plan


def distill_pd(subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: Mapping[str, Any],
               checkpoint_dir: str | Path | None = None, metrics_log: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    teacher, tmeta = load_edm_teacher(teacher_dir, accelerator.device, "progressive distillation")
    sigma_min, sigma_max = tmeta["sigma_min"], tmeta["sigma_max"]
    rho = float(cfg.get("rho", RHO))
    pd = cfg["pd"]
    plan = stage_plan(pd["start_scales"], pd["stage_steps"], pd.get("final_stage_steps"))
    metric = cfg.get("metric", "l2")
    distance = get_distance(metric, cfg.get("lpips"))
    if isinstance(distance, torch.nn.Module):
        distance = distance.to(accelerator.device)
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    labels = class_labels(tmeta["net"], subset.labels, str(subset_path))
    meta = model_meta("edm", dict(tmeta["net"], dropout=0.0), tmeta["resolution"], tmeta["channels"], tmeta["sigma_data"],
                      sigma_min, sigma_max, teacher=str(teacher_dir), method="pd")
    log.info("progressive distillation: %d stages %s (student steps: optimizer steps), metric=%s, %d parameters",
             len(plan), plan, metric, count_parameters(teacher))
    stages, history, seconds, current = [], [], 0.0, teacher
    for k, (n, steps) in enumerate(plan):
        stage_dir = Path(checkpoint_dir) / f"stage-{n}" if checkpoint_dir else None
        fingerprint = run_fingerprint(cfg, subset_path, teacher_dir, stage=k, student_steps=n, plan=plan, **NO_DROPOUT)
        done = _finished_stage(stage_dir, fingerprint, accelerator.device)
        if done is not None:
            current, stats = done
            log.info("stage %d (%d student steps) finished earlier: %s", k, n, stage_dir)
        else:
            tcfg = TrainConfig.from_dict(dict(cfg["train"], steps=steps, seed=cfg["train"].get("seed", 0) + k))
            set_seed(tcfg.seed)
            student = without_dropout(current).requires_grad_(True).train()
            objective = ProgressiveDistillationStage(student, current, n, sigma_min, sigma_max, rho, distance)
            log.info("stage %d: a %d-step student from a %d-step teacher, %d optimizer steps", k, n, 2 * n, steps)
            stage_log = Path(metrics_log).with_suffix(f".stage-{n}.jsonl") if metrics_log else None
            ema, stats = train(objective, images, subset.expanded_indices(), tcfg, accelerator,
                               stage_dir / "ckpt" if stage_dir else None, fingerprint, None, stage_log, labels)
            current = ema.to(accelerator.device)
            if stage_dir is not None and accelerator.is_main_process:
                save_model(stage_dir / "result", ema, dict(meta, pd_steps=n), dict(stats, fingerprint=fingerprint))
            accelerator.wait_for_everyone()
        offset = sum(s["steps"] for s in stages)
        history += [dict(r, step=r["step"] + offset, stage_step=r["step"], student_steps=n) for r in stats["history"]]
        stages.append({"student_steps": n, "steps": stats["steps"], "seconds": stats["seconds"],
                       "final_loss": stats["final_loss"]})
        seconds += stats["seconds"]
    total = sum(s["steps"] for s in stages)
    stats = {"method": "pd", "teacher": str(teacher_dir), "metric": metric, "start_scales": pd["start_scales"],
             "stages": stages, "steps": total, "seconds": seconds, "batch_size": cfg["train"]["batch_size"],
             "images_seen": total * cfg["train"]["batch_size"], "final_loss": stages[-1]["final_loss"],
             "num_classes": num_classes(tmeta["net"]), "student_steps": 1, "history": history}
    if accelerator.is_main_process:
        if metrics_log:  # the whole run, stage after stage, on one step axis
            with atomic_output(metrics_log) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        (Path(out_dir) / "snapshots").mkdir(parents=True, exist_ok=True)
        save_model(out_dir, current.to("cpu"), dict(meta, pd_steps=1), stats)
    accelerator.end_training()
    return stats


def _finished_stage(stage_dir: Path | None, fingerprint: str, device) -> tuple[torch.nn.Module, dict] | None:
    """A stage's saved result, if it was written by the same run (same fingerprint)."""
    if stage_dir is None or not (stage_dir / "result" / "stats.json").exists():
        return None
    stats = json.loads((stage_dir / "result" / "stats.json").read_text())
    if stats.get("fingerprint") != fingerprint:
        return None
    model, _ = load_model(stage_dir / "result", device)
    return model, stats
