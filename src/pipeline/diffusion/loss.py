"""The EDM denoising loss (Karras et al. 2022, Eq. 8 with the log-normal sigma distribution)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .noise import BatchNoise
from .precond import EDMDenoiser, conditioned


@dataclass(frozen=True)
class EDMLoss:
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_data: float = 0.5

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2: unit loss at every noise level."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def __call__(self, denoiser: EDMDenoiser, y: torch.Tensor,
                 noise: BatchNoise | torch.Generator | None = None,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weighted loss, shape (batch,). y is a batch of clean images in [-1, 1]; a
        class-conditional denoiser sees each image's class (NVlabs/edm training/loss.py EDMLoss: net(y + n, sigma, labels))."""
        noise = BatchNoise.of(noise, y.shape[0], y.device)
        rnd = noise.randn(dtype=y.dtype)
        sigma = (rnd * self.p_std + self.p_mean).exp()
        n = noise.randn(y.shape[1:], dtype=y.dtype) * sigma.reshape(-1, 1, 1, 1)
        d = conditioned(denoiser, class_labels)(y + n, sigma)
        # Mean over pixels where NVlabs/edm sums (training/loss.py returns the per-pixel loss and
        # training/training_loop.py backpropagates loss.sum() / batch): the gradient is smaller by
        # C x H x W, which Adam's update ignores except through eps (1e-8; EDM's CIFAR-10 gradients
        # are orders of magnitude above it), so the Adam teachers train as EDM's do, and one
        # learning rate and loss scale read the same across resolutions. A non-adaptive optimizer's
        # learning rate, or a gradient-norm clip, would need multiplying by C x H x W to match EDM's.
        return (self.weight(sigma).reshape(-1, 1, 1, 1) * (d - y) ** 2).flatten(1).mean(1)
