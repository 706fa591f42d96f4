"""Feature spaces in which generated samples are compared with training images.

`pixels` is the space of the L2 ratio criterion. SSCD (copy detection) and CLIP plug in here as
further entries, each loading its weights from a fetched local file.
"""
from __future__ import annotations

import numpy as np


def pixels(images: np.ndarray) -> np.ndarray:
    """Flattened pixel values in [0, 1]; the ratio criterion is scale-free, the scale only aids reading distances."""
    return (images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)


SPACES = {"pixels": pixels}


def embed(images: np.ndarray, space: str) -> np.ndarray:
    if space not in SPACES:
        raise ValueError(f"unknown embedding space {space!r}; available: {sorted(SPACES)}")
    return SPACES[space](images)
