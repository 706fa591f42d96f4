"""Distribution matching distillation (DMD, Yin et al. 2024) of an EDM teacher into a one-step generator.

The generator G(z) = D_G(sigma_max z, sigma_max) is an EDM denoiser initialised from the teacher and
sampled with one Euler step to sigma = 0 (tianweiy/DMD2 main/edm/edm_unified_model.py: the
feedforward model is a copy of the teacher fed noise * conditioning_sigma = 80; main/edm/
test_folder_edm.py samples it the same way). Two scores judge its samples x = G(z), both at
x_t = x + sigma eps:

- the real score: the frozen teacher D_real;
- the fake score: a copy of the teacher, D_fake, trained online by denoising score matching on
  generator samples (detached), sigma uniform over a 1000-level Karras grid, EDM's weight
  1/sigma^2 + 1/sigma_data^2 (main/edm/edm_guidance.py compute_loss_fake).

The generator's loss (edm_guidance.py compute_distribution_matching_loss) pushes x along
grad = (D_fake - D_real) / mean|x - D_real| (the mean over each sample's pixels), sigma uniform over
the grid's levels 20..980 of 1000 (min_step_percent 0.02, max_step_percent 0.98):
loss = 0.5 ||x - stopgrad(x - grad)||^2, averaged, whose gradient in x is grad itself.

DMD2 updates the fake score every iteration and the generator every fifth (dfake_gen_update_ratio 5,
experiments/imagenet/*.sh), each iteration's fake-score update on that iteration's generator samples
(train_edm.py train_one_step: `guidance_data_dict` of the generator's turn). Here one training step
is DMD2's five iterations: the generator update, then `fake_updates` fake-score updates, the first
on the very samples the generator's loss was computed from (drawn before its update, as in DMD2),
the others on fresh samples of the updated generator (DMD2's iterations without a generator
update, each drawing new noise). The fake score trains with AdamW, lr = the generator's, weight decay
0.01, gradient norm clipped at 10 (main/edm/train_edm.py); both optimizers warm up linearly over
DMD2's `--warmup_step` (500 iterations, `constant_with_warmup`): the generator through
`train.lr_rampup_steps` (500 / 5 = 100 generator updates), the fake score through
`fake_lr_rampup_updates` (500 of its updates).

Every network trained here (generator, fake score) is the teacher's with dropout 0, as DMD2 builds
them (main/edm/edm_network.py: `dropout=0.0`); so at initialisation, fake = real and the
distribution-matching gradient is exactly zero.

The study cites DMD (Yin et al. 2024), whose generator loss adds a regression loss (`regression`):
d(G(z_k), y_k) on pairs of noise z_k and the teacher's deterministic Heun sample y_k from it, computed
once when the job starts, weighted by `weight` (0.25 and LPIPS in DMD). A regression onto a
memorizing teacher's outputs is a direct path for copying, so the grid runs DMD as cited and, as its
own row, without the regression (DMD2's form without its GAN head: the GAN needs the real images the
teacher was trained on, which would feed the training set to the student directly).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import read_subset
from ..diffusion import RHO, EDMDenoiser, edm_sample, karras_sigmas
from ..diffusion.noise import BatchNoise, step_seed
from ..io import images_to_unit
from ..modelio import model_meta
from ..nets import count_parameters, num_classes
from ..train import TrainConfig
from .distances import get_distance
from .run import NO_DROPOUT, load_edm_teacher, train_student, without_dropout

log = logging.getLogger(__name__)

GRID_LEVELS = 1000  # main/edm/edm_guidance.py: get_sigmas_karras(num_train_timesteps=1000, ...)
FAKE_STREAM = 2  # the fake score's draws: a stream apart from the generator's (seed, step)
PAIR_STREAM = 3  # the regression pairs' noise


def generate(generator, z: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """The one-step sample D_G(sigma_max z, sigma_max)."""
    return generator(z * sigma_max, torch.full((z.shape[0],), sigma_max, device=z.device, dtype=z.dtype))


def distribution_matching_loss(x: torch.Tensor, real, fake, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 mean((x - stopgrad(x - grad))^2), grad = (D_fake - D_real) / mean|x - D_real| at x + sigma eps."""
    x_t = x.detach() + sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        d_real, d_fake = real(x_t, sigma), fake(x_t, sigma)
        p_real, p_fake = x.detach() - d_real, x.detach() - d_fake
        weight = p_real.abs().flatten(1).mean(1).reshape(-1, 1, 1, 1)
        grad = torch.nan_to_num((p_real - p_fake) / weight)
    return 0.5 * ((x - (x - grad).detach()) ** 2).flatten(1).mean(1)


def fake_score_loss(fake, x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """Per-sample denoising loss of the fake score on (detached) generator samples, EDM's weight."""
    d = fake(x + sigma.reshape(-1, 1, 1, 1) * eps, sigma)
    weight = (sigma ** -2 + sigma_data ** -2).reshape(-1, 1, 1, 1)
    return (weight * (d - x) ** 2).flatten(1).mean(1)


class DistributionMatching:
    """The generator's objective for the shared training loop; the fake score trains in after_step."""

    def __init__(self, generator: EDMDenoiser, teacher: EDMDenoiser, fake: EDMDenoiser, cfg: Mapping[str, Any],
                 accelerator: Accelerator, batch_size: int, seed: int, shape: tuple[int, ...],
                 pairs: tuple[torch.Tensor, torch.Tensor] | None = None, distance=None):
        self.model = generator
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = fake.train().requires_grad_(True)
        self.accelerator = accelerator
        self.sigma_max = float(cfg["sigma_max"])
        self.sigma_data = float(generator.sigma_data)
        self.grid = karras_sigmas(GRID_LEVELS, cfg["sigma_min"], cfg["sigma_max"], cfg.get("rho", RHO)).flip(0).float()
        self.grid = self.grid.to(accelerator.device)  # once, not per loss call
        self.min_step = int(cfg.get("min_step_percent", 0.02) * GRID_LEVELS)
        self.max_step = int(cfg.get("max_step_percent", 0.98) * GRID_LEVELS)
        self.fake_updates = int(cfg.get("fake_updates", 5))
        self.fake_opt = torch.optim.AdamW(self.fake.parameters(), lr=float(cfg["fake_lr"]),
                                          betas=tuple(cfg.get("fake_betas", (0.9, 0.999))),
                                          weight_decay=float(cfg.get("fake_weight_decay", 0.01)))
        self.fake_grad_clip = cfg.get("fake_grad_clip", 10.0)
        self.fake_lr = float(cfg["fake_lr"])
        self.fake_rampup = int(cfg.get("fake_lr_rampup_updates", 0))
        self._drawn: list[torch.Tensor] = []  # this step's generator samples, for the first fake-score update
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.shape = tuple(shape)
        self.pairs, self.distance = pairs, distance
        self.regression_weight = float(cfg.get("regression", {}).get("weight", 0.0))

    def _sigmas(self, noise: BatchNoise, lo: int, hi: int) -> torch.Tensor:
        return self.grid[lo + noise.randint(hi - lo)]

    def loss(self, model, y, noise, labels=None):
        """The generator's loss; the batch y only sets the batch size (and the regression pairs' rows)."""
        real, fake = self.teacher, self.fake
        z = noise.randn(y.shape[1:], dtype=y.dtype)
        x = generate(model, z, self.sigma_max)
        self._drawn.append(x.detach())
        sigma = self._sigmas(noise, self.min_step, self.max_step + 1).to(y.dtype)
        loss = distribution_matching_loss(x, real, fake, sigma, noise.randn(y.shape[1:], dtype=y.dtype))
        if self.pairs is not None and self.regression_weight > 0:
            k = noise.randint(len(self.pairs[0]))
            z_pair, y_pair = (p[k.cpu()].to(y.device) for p in self.pairs)  # the rows, not every pair, to the device
            loss = loss + self.regression_weight * self.distance(generate(model, z_pair, self.sigma_max), y_pair)
        return loss

    def after_step(self, model, step):
        """`fake_updates` fake-score steps: the first on the samples this step's generator loss drew
        (its micro-batches, before the generator's update), the others on fresh samples of the updated
        generator; each process takes its rows of one global batch and the gradients are averaged, so
        every process keeps the same fake score."""
        acc = self.accelerator
        world, rank = acc.num_processes, acc.process_index
        rows = self.batch_size // world
        gen = torch.Generator(device=acc.device)
        drawn, self._drawn = self._drawn, []
        for j in range(self.fake_updates):
            gen.manual_seed(step_seed(step_seed(self.seed, step), FAKE_STREAM * 1000 + j))
            noise = BatchNoise(gen, self.batch_size, rank * rows, (rank + 1) * rows)
            fresh = noise.randn(self.shape)
            if j == 0 and drawn:
                x = torch.cat(drawn).to(fresh.dtype)
                if len(x) != len(fresh):
                    raise RuntimeError(f"this step's generator loss drew {len(x)} samples on this process, its share "
                                       f"of the batch is {len(fresh)}: the fake score would train on other rows")
            else:
                with torch.no_grad():
                    x = generate(model, fresh, self.sigma_max)
            if self.fake_rampup:  # DMD2's constant_with_warmup, counted in fake-score updates
                for g in self.fake_opt.param_groups:
                    g["lr"] = self.fake_lr * min((step * self.fake_updates + j + 1) / self.fake_rampup, 1.0)
            sigma = self._sigmas(noise, 0, GRID_LEVELS)
            loss = fake_score_loss(self.fake, x, sigma, noise.randn(self.shape), self.sigma_data).mean()
            self.fake_opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                for p in self.fake.parameters():
                    if p.grad is not None:
                        p.grad = acc.reduce(p.grad, reduction="mean")
            if self.fake_grad_clip:
                torch.nn.utils.clip_grad_norm_(self.fake.parameters(), self.fake_grad_clip)
            self.fake_opt.step()

    def extra_modules(self):
        return {"fake": self.fake, "fake_opt": self.fake_opt}


def regression_pairs(teacher, count: int, shape, seed: int, steps: int, sigma_min: float, sigma_max: float,
                     device, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """DMD's paired data: noise z_k and the teacher's deterministic Heun sample from sigma_max z_k."""
    gen = torch.Generator(device="cpu").manual_seed(step_seed(seed, PAIR_STREAM))
    z = torch.randn((count, *shape), generator=gen)
    ys = [edm_sample(teacher, z[i:i + batch].to(device), steps, sigma_min, sigma_max).cpu()
          for i in range(0, count, batch)]
    return z, torch.cat(ys)


def distill_dmd(subset_path: str | Path, teacher_dir: str | Path, out_dir: str | Path, cfg: Mapping[str, Any],
                checkpoint_dir: str | Path | None = None, metrics_log: str | Path | None = None) -> dict:
    accelerator = Accelerator()
    tcfg = TrainConfig.from_dict(cfg["train"])
    set_seed(tcfg.seed)
    teacher, tmeta = load_edm_teacher(teacher_dir, accelerator.device, "DMD")
    if num_classes(tmeta["net"]) is not None:
        raise ValueError("DMD here distils unconditional teachers (the study's CIFAR-10 and digits teachers)")
    dmd = dict(cfg["dmd"], sigma_min=tmeta["sigma_min"], sigma_max=tmeta["sigma_max"])
    subset = read_subset(subset_path)
    images = torch.from_numpy(images_to_unit(subset.images))
    shape = tuple(images.shape[1:])
    pairs, distance, metric = None, None, None
    if "regression" in dmd:
        reg = dmd["regression"]
        metric = reg.get("metric", "lpips")
        distance = get_distance(metric, cfg.get("lpips"))
        if isinstance(distance, torch.nn.Module):
            distance = distance.to(accelerator.device)
        t0 = time.time()
        pairs = regression_pairs(teacher, int(reg["pairs"]), shape, tcfg.seed, int(reg.get("steps", 18)),
                                 tmeta["sigma_min"], tmeta["sigma_max"], accelerator.device)
        log.info("DMD regression: %d teacher pairs (Heun, %d steps) in %.1f s", len(pairs[0]),
                 int(reg.get("steps", 18)), time.time() - t0)
    generator = without_dropout(teacher).requires_grad_(True).train()
    fake = without_dropout(teacher)
    objective = DistributionMatching(generator, teacher, fake, dmd, accelerator, tcfg.batch_size, tcfg.seed, shape,
                                     pairs, distance)
    log.info("DMD: one-step generator at sigma %.3g, %d fake-score updates per generator update, fake lr %.3g, "
             "regression %s, %d parameters", dmd["sigma_max"], objective.fake_updates, dmd["fake_lr"],
             f"{metric} x {objective.regression_weight}" if pairs is not None else "off", count_parameters(generator))
    meta = model_meta("edm", dict(tmeta["net"], dropout=0.0), tmeta["resolution"], tmeta["channels"], tmeta["sigma_data"],
                      tmeta["sigma_min"], tmeta["sigma_max"], teacher=str(teacher_dir), method="dmd")
    stats = train_student(objective, images, subset.expanded_indices(), tcfg, accelerator, cfg, subset_path, teacher_dir,
                          out_dir, meta, "dmd", checkpoint_dir, metrics_log,
                          fingerprint_extra={**NO_DROPOUT, "fake_first_update": "the generator loss's samples"},
                          fake_updates=objective.fake_updates,
                          fake_lr=dmd["fake_lr"], regression=dmd.get("regression"), num_classes=None)
    return stats
