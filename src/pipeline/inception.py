"""Inception FID features for in-memory image arrays, built from clean-fid's own pieces.

clean-fid computes features from image folders and downloads the Inception weights on first
use. Cluster jobs have no internet, so the TorchScript weights are fetched once by the
Snakemake rule `fetch_inception` (on a login node) and every job loads them from that local
file. Everything numerical is clean-fid's: `InceptionV3W` (normalisation (x - 128) / 128 and
the TorchScript network), the "clean" resizer (PIL bicubic on float32 channels, no
re-quantisation) and `frechet_distance`. This module only adds the glue for NHWC uint8 arrays.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from cleanfid.fid import frechet_distance
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from tqdm import tqdm

from .data.fetch import KNOWN_FILES

INCEPTION_FILE = {"name": KNOWN_FILES["inception"]["dest"], **KNOWN_FILES["inception"]}

FEATURE_DIM = 2048
RESOLUTION = 299


def load_inception(weights_path, device="cpu") -> InceptionV3W:
    """clean-fid's Inception feature model from a local file, never downloading.

    `InceptionV3W(folder, download=False)` loads `<folder>/inception-2015-12-05.pt`, so the file
    must carry that exact name.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path}: they are provided by "
            f"`snakemake fetch_inception` (run it on a login node, jobs never download)."
        )
    if path.name != INCEPTION_FILE["name"]:
        raise ValueError(
            f"clean-fid loads the Inception weights by the file name {INCEPTION_FILE['name']!r}; "
            f"got {path.name!r} ({path})"
        )
    model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    return model.to(device).eval()


def _as_rgb_uint8(images) -> np.ndarray:
    """Validate NHWC uint8 and repeat grayscale to 3 channels, as clean-fid's `.convert('RGB')`."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected NHWC images with C in (1, 3), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (quantised like saved PNGs), got {images.dtype}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def inception_features(images_uint8_NHWC, weights_path, device="cpu", batch_size=64) -> np.ndarray:
    """(n, 2048) float64 Inception pool features, matching clean-fid mode="clean".

    Each image goes through `build_resizer("clean")` (float32 299x299x3 in [0, 255]) exactly as
    clean-fid's ResizeDataset does for files; the model applies the (x - 128) / 128 scaling.
    """
    images = _as_rgb_uint8(images_uint8_NHWC)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images)
    if n == 0:
        return np.empty((0, FEATURE_DIM), dtype=np.float64)
    model = load_inception(weights_path, device=device)
    resize = build_resizer("clean")
    out = np.empty((n, FEATURE_DIM), dtype=np.float64)
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="inception features", unit="batch"):
            chunk = images[start:start + batch_size]
            resized = np.stack([resize(img) for img in chunk]).astype(np.float32, copy=False)
            batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous().to(device)
            out[start:start + len(chunk)] = model(batch).detach().cpu().numpy()
    return out


def fid_from_features(feats_a, feats_b) -> float:
    """FID between two feature sets, as clean-fid's `fid_from_feats` (mean, np.cov rowvar=False)."""
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) feature arrays with equal d, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a covariance needs at least 2 samples per set")
    mu_a, sigma_a = a.mean(axis=0), np.cov(a, rowvar=False)
    mu_b, sigma_b = b.mean(axis=0), np.cov(b, rowvar=False)
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
