"""Feature spaces in which generated samples are compared with training images.

`pixels` is the space of the L2 ratio criterion. `sscd` is the copy-detection descriptor of Pizzi
et al. (2022), the space of the study's "SSCD Mem / p95" columns, read from a fetched TorchScript
file. CLIP plugs in here as a further entry.
"""
from __future__ import annotations

from pathlib import Path

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


# SSCD preprocessing, selectable:
# - `official`: facebookresearch/sscd-copy-detection README's `small_288`: Resize(288) (short side,
#   bilinear, antialiased), ToTensor, ImageNet mean/std.
# - `square_320`: the same README's `skew_320`: Resize([320, 320]).
# - `dcr`: Somepalli et al.'s somepago/DCR diff_retrieval.py (copied by Wen et al.,
#   diffusion_memorization optim_utils.py): Resize(256), CenterCrop(224), Normalize([0.5], [0.5]),
#   i.e. inputs in [-1, 1] rather than ImageNet-normalised.
# Images smaller than the target (CIFAR's 32 px, digits' 16 px) are upsampled by that same
# bilinear resize. Similarities near the 0.5 copy threshold depend on this choice: report it.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSCD_PREPROCESSING = {"official": ("short_side", 288, None), "square_320": ("square", 320, None),
                      "dcr": ("short_side", 256, 224)}


def sscd_preprocess(images: np.ndarray, preprocessing: str = "official"):
    """uint8 NHWC -> the float tensor SSCD takes (NCHW, RGB, resized, ImageNet-normalised)."""
    import torch
    import torch.nn.functional as F

    if preprocessing not in SSCD_PREPROCESSING:
        raise ValueError(f"unknown SSCD preprocessing {preprocessing!r}; available: {sorted(SSCD_PREPROCESSING)}")
    mode, size, crop = SSCD_PREPROCESSING[preprocessing]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[2:]
    if mode == "short_side":
        out = (size, round(w * size / h)) if h <= w else (round(h * size / w), size)
    else:
        out = (size, size)
    x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)
    if crop is not None:
        top, left = (x.shape[2] - crop) // 2, (x.shape[3] - crop) // 2
        x = x[:, :, top:top + crop, left:left + crop]
        return (x - 0.5) / 0.5
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (x - mean) / std


def load_sscd(path: str | Path, device: str = "cpu"):
    """The SSCD TorchScript model (e.g. sscd_disc_mixup.torchscript.pt) from its fetched file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: it is the SSCD copy-detection model, fetched on a login node "
                                f"by the fetch_sscd rule (`snakemake {path}`)")
    return torch.jit.load(str(path), map_location=device).eval()


def sscd(images: np.ndarray, weights: str | Path, preprocessing: str = "official", batch_size: int = 64,
         device: str | None = None) -> np.ndarray:
    """L2-normalised SSCD descriptors (float32, one row per image); cosine similarity is their dot product."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_sscd(weights, device)
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = sscd_preprocess(images[start:start + batch_size], preprocessing).to(device)
            out.append(torch.nn.functional.normalize(model(x).float(), dim=1).cpu())
    return torch.cat(out).numpy().astype(np.float32)


def digits_descriptors(images: np.ndarray, classifier_dir: str | Path) -> np.ndarray:
    """L2-normalised penultimate features of the digits classifier (digits_classifier.py): the embedded data's
    download-free stand-in for SSCD, whose weights it does not have. It is a class-trained feature, not
    a copy detector, so its similarities are read against the yardsticks in the same space, never
    against SSCD's thresholds."""
    from .digits_classifier import ClassifierFeatures

    feats = ClassifierFeatures(classifier_dir).features(images)
    return (feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def write_embeddings(vectors: np.ndarray, out_path: str | Path, info: dict) -> None:
    """A float32 (n, d) array as .npy, and beside it a .json manifest saying what it embeds and how."""
    from .io import atomic_output, write_json

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, vectors)
    write_json(out_path.with_suffix(".json"), {**info, "shape": list(vectors.shape)})


def read_embeddings(path: str | Path) -> np.ndarray:
    """An embedding array, checked against its manifest (a truncated or swapped file is an error)."""
    from .io import CorruptFileError, read_json

    path = Path(path)
    manifest = path.with_suffix(".json")
    if not path.exists() or not manifest.exists():
        raise FileNotFoundError(f"{path} or its manifest {manifest.name} is missing: the embed rule writes them")
    try:
        vectors = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise CorruptFileError(f"{path}: not a readable .npy array ({exc})") from exc
    if list(vectors.shape) != read_json(manifest)["shape"]:
        raise CorruptFileError(f"{path} has shape {vectors.shape}, its manifest says {read_json(manifest)['shape']}")
    return vectors
