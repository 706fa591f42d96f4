"""Raw image sources: every dataset enters the pipeline as (uint8 NHWC images, int64 labels).

One small registry maps a config's `source` name to a loader, so larger datasets (ImageNet, COCO)
plug in later without touching the subset or training code.
"""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.io import CorruptFileError

Loader = Callable[[dict], "tuple[np.ndarray, np.ndarray]"]
SOURCES: dict[str, Loader] = {}


def register_source(name: str) -> Callable[[Loader], Loader]:
    """Add a loader under `name`; a loader takes the dataset config and returns (images, labels)."""

    def wrap(fn: Loader) -> Loader:
        SOURCES[name] = fn
        return fn

    return wrap


def load_source(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """Load the dataset named by `cfg["source"]` as (uint8 NHWC images, int64 labels)."""
    name = cfg.get("source")
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known sources: {', '.join(sorted(SOURCES))}")
    images, labels = SOURCES[name](cfg)
    return np.ascontiguousarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


@register_source("digits")
def load_digits(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (1797 images, ships with sklearn, so no download is ever needed).

    The default 16x16 lets a small UNet downsample twice (16 -> 8 -> 4) while staying fast enough
    for a CPU smoke run. Upscaling is bilinear (align_corners=False, no antialias) so the result
    is a fixed function of the sklearn pixels and identical on every machine.
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_load_digits

    resolution = int(cfg.get("resolution", 16))
    if resolution < 8 or resolution % 8:
        raise ValueError(f"digits resolution must be a positive multiple of 8, got {resolution}")
    bunch = sk_load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float64) * (255.0 / 16.0)).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False)
    images = torch.round(x).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, bunch.target.astype(np.int64)


_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_MEMBERS = {
    "train": [f"{_CIFAR_DIR}/data_batch_{i}" for i in range(1, 6)],
    "test": [f"{_CIFAR_DIR}/test_batch"],
}


@register_source("cifar10")
def load_cifar10(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 read straight from the official `cifar-10-python.tar.gz`, without unpacking it.

    Reading the archive in place keeps one checksummed file as the only copy on disk. The batches
    are pickles, which is acceptable only because the archive's MD5 is verified when fetched.
    """
    archive = Path(cfg["archive"])
    split = cfg.get("split", "train")
    if split not in _CIFAR_MEMBERS:
        raise ValueError(f"cifar10 split must be one of {sorted(_CIFAR_MEMBERS)}, got {split!r}")
    if not archive.is_file():
        raise FileNotFoundError(
            f"CIFAR-10 archive not found: {archive}. It is provided by `snakemake fetch_cifar10` "
            f"(which downloads it), or copy cifar-10-python.tar.gz there by hand."
        )
    images, labels = [], []
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in _CIFAR_MEMBERS[split]:
                f = tar.extractfile(member)
                if f is None:
                    raise KeyError(member)
                batch = pickle.load(f, encoding="bytes")
                data = np.asarray(batch[b"data"], dtype=np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    except (KeyError, EOFError, tarfile.TarError, pickle.UnpicklingError, ValueError, OSError) as exc:
        raise CorruptFileError(
            f"{archive}: not a readable CIFAR-10 python archive ({type(exc).__name__}: {exc}); "
            f"delete it and rerun `snakemake fetch_cifar10`"
        ) from exc
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


@register_source("imagenet64")
def load_imagenet64(cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """ImageNet at 64x64 from the directory `prepare_imagenet64` wrote (`cfg["prepared"]`), memory-mapped:
    a subset job reads only the rows it selects."""
    from pipeline.data.imagenet import load_prepared

    return load_prepared(cfg["prepared"])
