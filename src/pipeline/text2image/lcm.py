"""Latent consistency distillation (Luo et al. 2023) of a fine-tuned latent diffusion teacher.

The recipe is diffusers' examples/consistency_distillation/train_lcm_distill_sd_wds.py (full UNet):
the student is the teacher's UNet plus a guidance-scale embedding (`time_cond_proj_dim`, 256), the
target is an EMA of the student (rate 0.95). For a latent x0 and a DDIM grid of 50 timesteps
t_n = 20 n - 1 (k = T/50 = 20 training steps apart), a row draws n, its start timestep s = t_n and
previous timestep t = max(s - k, 0), noise, and a guidance weight w ~ U[w_min, w_max]; x_s is x0
noised to s; the teacher gives the classifier-free guided prediction cond + w (cond - uncond) at x_s,
one DDIM step takes it to x_t; the loss is the Huber distance sqrt(d^2 + c^2) - c (c = 0.001) between
the student's consistency output at (x_s, s) and the target's at (x_t, t), both conditioned on the
prompt and w. The consistency output is c_skip(s) x + c_out(s) x0_pred with LCM's boundary scalings
at timestep scaling 10, taken from diffusers' LCMScheduler, the same object that samples the student.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch

from ..diffusion.noise import BatchNoise
from ..distill.distances import l2
from ..train import ema_update
from .finetune import PromptTable
from .latents import sample_latents

# train_lcm_distill_sd_wds.py defaults and its README's SD1.5 command line (--loss_type huber,
# --ema_decay 0.95, --learning_rate 1e-6); config/README.md lists them with the rest of the recipe.
LCM_DEFAULTS = dict(num_ddim_timesteps=50, w_min=5.0, w_max=15.0, time_cond_proj_dim=256, timestep_scaling=10.0,
                    loss="huber", huber_c=0.001, target_ema=0.95)


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the guidance weight (w x 1000, `dim` features), identical to the training
    script's `guidance_scale_embedding` and the LCM pipeline's `get_guidance_scale_embedding`, which is a
    pipeline method and so not callable without one."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=w.device, dtype=torch.float32)
                      * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class DDIMSolver:
    """One deterministic DDIM step per row, from grid point n to the point k training steps earlier.

    diffusers' DDIMScheduler.step takes one timestep per call; a distillation batch has one per row,
    so this is the training script's vectorised `DDIMSolver`: grid t_n = (n + 1) T/N - 1, and the step
    from t_n uses alpha-bar at t_{n-1} (at training step 0 for n = 0).
    """

    def __init__(self, alphas_cumprod: torch.Tensor, num_train_timesteps: int, num_ddim_timesteps: int):
        ratio = num_train_timesteps // num_ddim_timesteps
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * ratio - 1
        self.step_size = ratio
        alphas_cumprod = alphas_cumprod.double()
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]]).float()

    def step(self, pred_x0: torch.Tensor, pred_noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod_prev.to(pred_x0.device)[index].reshape(-1, 1, 1, 1)
        return a.sqrt() * pred_x0 + (1 - a).sqrt() * pred_noise


def predicted_x0_and_noise(output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor, scheduler):
    """(x0, epsilon) implied by a UNet output at timestep t (train_lcm_distill_sd_wds.py
    get_predicted_original_sample / get_predicted_noise) for epsilon or v prediction."""
    abar = scheduler.alphas_cumprod.to(sample.device)[t].reshape(-1, 1, 1, 1).float()
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - sigma * output) / alpha, output
    if kind == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    raise ValueError(f"unsupported prediction type {kind!r}: epsilon or v_prediction")


def lcm_student(teacher_unet, time_cond_proj_dim: int = 256):
    """The teacher's UNet with a guidance-scale embedding added (its projection freshly initialised, the
    rest copied), as train_lcm_distill_sd_wds.py builds the student."""
    from diffusers import UNet2DConditionModel

    dim = teacher_unet.config.time_cond_proj_dim or time_cond_proj_dim
    student = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=dim)
    missing, unexpected = student.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise ValueError(f"student and teacher UNets differ beyond the guidance embedding: missing {missing}, "
                         f"unexpected {unexpected}")
    return student.train()


def consistency_output(unet_out, t, sample, scheduler, boundary) -> torch.Tensor:
    """c_skip(t) x_t + c_out(t) x0_pred(x_t, t): the consistency function at t."""
    c_skip, c_out = boundary(t)
    x0, _ = predicted_x0_and_noise(unet_out, t, sample, scheduler)
    return c_skip.reshape(-1, 1, 1, 1) * sample + c_out.reshape(-1, 1, 1, 1) * x0


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-row mean of sqrt((a - b)^2 + c^2) - c, the training script's Huber loss."""
    return ((a.float() - b.float()).square() + c * c).sqrt().sub(c).mean(dim=tuple(range(1, a.ndim)))


class LCMObjective:
    """The shared training loop's objective for LCM: rows are cached posteriors, labels prompt numbers."""

    def __init__(self, student, teacher, scheduler, scaling_factor: float, prompts: PromptTable,
                 settings: Mapping[str, Any] | None = None, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None):
        from diffusers import LCMScheduler

        s = {**LCM_DEFAULTS, **(settings or {})}
        if s["loss"] not in ("huber", "l2"):
            raise ValueError(f"unknown LCM loss {s['loss']!r}: huber or l2")
        if not s["w_min"] <= s["w_max"]:
            raise ValueError(f"w_min {s['w_min']} exceeds w_max {s['w_max']}")
        self.settings = s
        self.model = student
        self.teacher = teacher.requires_grad_(False).eval().to(device)
        self.target = copy.deepcopy(student).requires_grad_(False).train()
        self.scheduler = scheduler
        self.boundary = LCMScheduler.from_config(scheduler.config, timestep_scaling=s["timestep_scaling"]) \
            .get_scalings_for_boundary_condition_discrete
        self.solver = DDIMSolver(scheduler.alphas_cumprod, scheduler.config.num_train_timesteps,
                                 s["num_ddim_timesteps"])
        self.scaling_factor = float(scaling_factor)
        self.prompts = prompts
        self.embed_dim = student.config.time_cond_proj_dim
        # The teacher's and target's passes take no gradient and are not prepared by accelerate, so its
        # mixed precision does not reach them: they run under the same autocast explicitly, as the
        # recipe runs them (torch.autocast around teacher_unet and target_unet).
        self.autocast_dtype = autocast_dtype

    def loss(self, model, y, noise, labels=None):
        if labels is None:
            raise ValueError("a text-to-image objective needs each row's prompt number as its label")
        s = self.settings
        noise = BatchNoise.of(noise, y.shape[0], y.device)
        latents = sample_latents(y, noise, self.scaling_factor)
        eps = noise.randn(latents.shape[1:], dtype=latents.dtype)
        index = noise.randint(len(self.solver.timesteps))
        w = s["w_min"] + (s["w_max"] - s["w_min"]) * noise.rand()
        start = self.solver.timesteps.to(y.device)[index]
        t = (start - self.solver.step_size).clamp(min=0)
        cond = self.prompts(labels, y.device)
        w_embedding = guidance_scale_embedding(w, self.embed_dim).to(latents.dtype)
        x_start = self.scheduler.add_noise(latents, eps, start)
        online = consistency_output(model(x_start, start, timestep_cond=w_embedding, encoder_hidden_states=cond).sample,
                                    start, x_start, self.scheduler, self.boundary)
        with torch.no_grad(), torch.autocast(y.device.type, dtype=self.autocast_dtype or torch.float32,
                                             enabled=self.autocast_dtype is not None):
            uncond = self.prompts(torch.full_like(labels, self.prompts.empty_index), y.device)
            both = self.teacher(torch.cat([x_start, x_start]), torch.cat([start, start]),
                                encoder_hidden_states=torch.cat([cond, uncond])).sample.float()
            x0, pred_noise = predicted_x0_and_noise(both, torch.cat([start, start]), torch.cat([x_start, x_start]),
                                                    self.scheduler)
            (x0_c, x0_u), (n_c, n_u) = x0.chunk(2), pred_noise.chunk(2)
            g = w.reshape(-1, 1, 1, 1)
            x_prev = self.solver.step(x0_c + g * (x0_c - x0_u), n_c + g * (n_c - n_u), index).float()
            target = consistency_output(self.target(x_prev, t, timestep_cond=w_embedding,
                                                    encoder_hidden_states=cond).sample.float(),
                                        t, x_prev.float(), self.scheduler, self.boundary)
        if s["loss"] == "huber":
            return pseudo_huber(online, target, s["huber_c"])
        return l2(online.float(), target.float())

    def after_step(self, model, step):
        ema_update(self.target, model, self.settings["target_ema"])

    def extra_modules(self):
        return {"target": self.target}
