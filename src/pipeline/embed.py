"""Feature spaces in which generated samples are compared with training images.

`pixels` is the space of the L2 ratio criterion. SSCD (copy detection) and CLIP plug in here as
further entries, each loading its weights from a fetched local file.
"""
from __future__ import annotations

import numpy as np


def pixels(images: np.ndarray) -> np.ndarray:
    """Flattened uint8 pixel values: integers keep the nearest-neighbour search exact (see search.py);
    distances are reported in [0, 1] pixel units through DISTANCE_SCALE."""
    if images.dtype != np.uint8:
        raise ValueError(f"pixel space expects uint8 images, got {images.dtype}")
    return images.reshape(images.shape[0], -1)


SPACES = {"pixels": pixels}
# Factor from a space's vector units to the units distances are reported in (pixels: 0-255 -> 0-1).
DISTANCE_SCALE = {"pixels": 1.0 / 255.0}


def embed(images: np.ndarray, space: str) -> np.ndarray:
    if space not in SPACES:
        raise ValueError(f"unknown embedding space {space!r}; available: {sorted(SPACES)}")
    return SPACES[space](images)
