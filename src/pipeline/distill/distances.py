"""Distance functions d(x, y) for the consistency loss, by name, one value per sample.

LPIPS plugs in here as another entry once its backbone weights are fetched by their own rule.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample (Song et al. 2023 use the squared L2 norm)."""
    return ((x - y) ** 2).flatten(1).mean(1)


def pseudo_huber(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sqrt(||x - y||^2 + c^2) - c with c = 0.00054 sqrt(d) (Song & Dhariwal 2023, improved CT)."""
    d = x[0].numel()
    c = 0.00054 * math.sqrt(d)
    return (((x - y) ** 2).flatten(1).sum(1) + c * c).sqrt() - c


DISTANCES: dict[str, Distance] = {"l2": l2, "pseudo_huber": pseudo_huber}


def get_distance(name: str) -> Distance:
    if name not in DISTANCES:
        raise ValueError(f"unknown consistency metric {name!r}; available: {sorted(DISTANCES)}")
    return DISTANCES[name]
