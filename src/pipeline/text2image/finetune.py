"""Fine-tuning the UNet of a latent diffusion model on image-prompt pairs (the memorizing teacher).

The loss is diffusers' examples/text_to_image/train_text_to_image.py: a latent drawn from the image's
VAE posterior and scaled, t ~ U{0..T-1}, noise added by the backbone's own DDPMScheduler
(`add_noise`), and the MSE between the UNet's output and the noise (epsilon prediction) or the
velocity (`get_velocity`, v-prediction), conditioned on the prompt's text-encoder states. No noise
offset, SNR weighting or input perturbation (the script's defaults), and no augmentation (the study
forbids it). `empty_prompt_ratio` is the script's `--proportion_empty_prompts` (default 0): a teacher
trained from scratch, as the miniature's is, needs it to learn the unconditional prediction that
classifier-free guidance and LCM's guided targets use; Stable Diffusion already has one.
"""
from __future__ import annotations

import torch

from ..diffusion.noise import BatchNoise
from ..distill.distances import l2
from .latents import sample_latents


class PromptTable:
    """Cached prompt embeddings indexed by prompt number; row -1 (the last) is the empty prompt."""

    def __init__(self, embeddings: torch.Tensor, empty: torch.Tensor):
        if embeddings.shape[1:] != empty.shape[-2:]:
            raise ValueError(f"prompt embeddings {tuple(embeddings.shape)} and the empty prompt's "
                             f"{tuple(empty.shape)} differ in shape")
        self.table = torch.cat([embeddings, empty.reshape(1, *embeddings.shape[1:])]).float()

    @property
    def empty_index(self) -> int:
        return len(self.table) - 1

    def __call__(self, index: torch.Tensor, device) -> torch.Tensor:
        if self.table.device != torch.device(device):
            self.table = self.table.to(device)
        return self.table[index.to(device)]


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict under the schedule's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise ValueError(f"unsupported prediction type {kind!r}: epsilon or v_prediction")


class LatentDenoisingObjective:
    """The shared training loop's objective: rows are cached posteriors, labels are prompt numbers."""

    def __init__(self, unet: torch.nn.Module, scheduler, scaling_factor: float, prompts: PromptTable,
                 empty_prompt_ratio: float = 0.0):
        if not 0.0 <= empty_prompt_ratio < 1.0:
            raise ValueError(f"empty_prompt_ratio must lie in [0, 1), got {empty_prompt_ratio}")
        self.model = unet
        self.scheduler = scheduler
        self.scaling_factor = float(scaling_factor)
        self.prompts = prompts
        self.empty_prompt_ratio = float(empty_prompt_ratio)

    def conditioning(self, labels: torch.Tensor, noise: BatchNoise, device) -> torch.Tensor:
        """Each row's prompt states; a share `empty_prompt_ratio` of rows, drawn per row, get the empty prompt."""
        drop = noise.rand() < self.empty_prompt_ratio
        index = torch.where(drop.to(labels.device), torch.full_like(labels, self.prompts.empty_index), labels)
        return self.prompts(index, device)

    def loss(self, model, y, noise, labels=None):
        if labels is None:
            raise ValueError("a text-to-image objective needs each row's prompt number as its label")
        noise = BatchNoise.of(noise, y.shape[0], y.device)
        latents = sample_latents(y, noise, self.scaling_factor)
        eps = noise.randn(latents.shape[1:], dtype=latents.dtype)
        t = noise.randint(self.scheduler.config.num_train_timesteps)
        cond = self.conditioning(labels, noise, y.device)
        noisy = self.scheduler.add_noise(latents, eps, t)
        pred = model(noisy, t, encoder_hidden_states=cond).sample
        target = target_for(self.scheduler, latents, eps, t)
        return l2(pred.float(), target.float())

    def after_step(self, model, step):
        pass

    def extra_modules(self):
        return {}
