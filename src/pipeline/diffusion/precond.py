"""EDM preconditioning (Karras et al. 2022, Table 1) and the consistency-model boundary parameterization.

Both wrap the same raw network F(c_in * x, c_noise); they differ only in c_skip and c_out, which is
why a consistency student can be initialized from an EDM teacher's weights unchanged.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """c_skip, c_out, c_in, c_noise of the EDM denoiser D(x, sigma)."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def consistency_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """c_skip, c_out of Song et al. (2023): c_skip(sigma_min) = 1 and c_out(sigma_min) = 0, so f(x, sigma_min) = x."""
    d2 = sigma_data ** 2
    c_skip = d2 / ((sigma - sigma_min) ** 2 + d2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + d2).sqrt()
    return c_skip, c_out


class EDMDenoiser(nn.Module):
    """The EDM teacher D(x, sigma) = c_skip x + c_out F(c_in x, c_noise): estimates the clean image.

    Subclasses change only c_skip and c_out (see ConsistencyFunction).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def skip_out(self, sigma: torch.Tensor):
        c_skip, c_out, _, _ = edm_scalings(sigma, self.sigma_data)
        return c_skip, c_out

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`class_labels`: one class index per row, for a class-conditional net (EDM's D(x, sigma, y))."""
        sigma = _bcast(sigma, x)
        _, _, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        c_skip, c_out = self.skip_out(sigma)
        if class_labels is None:
            f = self.net((c_in * x), c_noise.flatten())
        else:
            f = self.net((c_in * x), c_noise.flatten(), class_labels)
        return c_skip * x + c_out * f.to(x.dtype)


class ConsistencyFunction(EDMDenoiser):
    """A consistency model f(x, sigma): maps any point of a PF-ODE trajectory to its sigma_min end."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002):
        super().__init__(net, sigma_data)
        self.sigma_min = float(sigma_min)

    def skip_out(self, sigma):
        return consistency_scalings(sigma, self.sigma_data, self.sigma_min)


def conditioned(model, class_labels: torch.Tensor | None):
    """The model as a function of (x, sigma) alone for rows of the given classes, which is how the ODE
    steps, samplers and losses call it; the model itself when there are no labels (unconditional)."""
    return model if class_labels is None else partial(model, class_labels=class_labels)
