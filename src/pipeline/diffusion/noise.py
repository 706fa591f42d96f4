"""Training noise that belongs to a row of the global batch, not to the process that computes it.

A training loss draws per-sample randomness (EDM's sigma and noise, consistency distillation's level
index and noise). If each process drew its own, the same config would train a different model on 1,
2 or 8 GPUs, or with and without gradient accumulation. Here every draw is made for the whole
global batch from a generator the training loop resets to the step's seed, and each micro-batch keeps
its own rows, so row i of step s gets the same sigma and noise whatever the split. Drawing the whole
batch costs little next to the network (a CIFAR-10 batch of 512 is 1.6M floats). torch's Philox
offsets could skip to a slice without drawing it, but only on CUDA, and the CPU path must agree.
"""
from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for the training randomness of `step` (independent streams per step)."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0] >> 1)


class BatchNoise:
    """Random draws for rows [lo, hi) of a global batch of `size` rows (see the module docstring)."""

    def __init__(self, generator: torch.Generator | None, size: int, lo: int = 0, hi: int | None = None,
                 device: torch.device | str | None = None):
        self.generator = generator
        self.size, self.lo, self.hi = int(size), int(lo), int(size if hi is None else hi)
        if not 0 <= self.lo < self.hi <= self.size:
            raise ValueError(f"rows [{lo}, {hi}) do not lie in a batch of {size}")
        self.device = generator.device if generator is not None else torch.device(device or "cpu")

    @classmethod
    def of(cls, noise: "BatchNoise | torch.Generator | None", rows: int, device) -> "BatchNoise":
        """Accept a plain generator (or None) where a loss is called on a batch of its own."""
        if isinstance(noise, BatchNoise):
            if noise.hi - noise.lo != rows:
                raise ValueError(f"noise for {noise.hi - noise.lo} rows, batch of {rows}")
            return noise
        return cls(noise, rows, device=device)

    def randn(self, sample_shape=(), dtype=torch.float32) -> torch.Tensor:
        full = torch.randn((self.size, *sample_shape), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.lo:self.hi]

    def randint(self, high: int) -> torch.Tensor:
        full = torch.randint(0, int(high), (self.size,), generator=self.generator, device=self.device)
        return full[self.lo:self.hi]

    def rand(self, dtype=torch.float32) -> torch.Tensor:
        """One uniform [0, 1) draw per row."""
        full = torch.rand((self.size,), generator=self.generator, device=self.device, dtype=dtype)
        return full[self.lo:self.hi]
