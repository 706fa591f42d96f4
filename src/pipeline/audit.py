"""A standalone memorization audit of any sample set against any training set.

For a practitioner who must check a (distilled) model before shipping it: the same nearest-
neighbour search and statistics as the pipeline, on a Parquet image table (a subset, a sample
shard) or a folder of images, as JSON, a PNG of the most-copied samples beside their nearest
training images, and an exit status that can gate a release:

    python -m pipeline audit --train train/ --samples samples/ --space pixels --out audit.json \
        --figure audit.png --fail-above 0.01
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .io import read_image_table, write_json
from .memorization import DEFAULT_RATIO, SSCD_THRESHOLD, l2_ratio_memorized, similarity_summary

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def read_images(path: str | Path, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 NHWC images (and group tags, when the table has them) from a Parquet image table, a sample
    manifest.json, or an image folder."""
    from PIL import Image

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if path.name == "manifest.json":  # the pipeline's sample shards, checksums verified
        from .shards import read_samples

        images, _, _ = read_samples(path)
        groups = None
    elif path.is_file():
        images, table, _ = read_image_table(path)
        groups = table.column("group").to_numpy(zero_copy_only=False) if "group" in table.column_names else None
    else:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{what} folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        loaded = []
        for f in files:
            with Image.open(f) as im:
                loaded.append((f, im.mode, np.asarray(im.convert("L" if im.mode in ("L", "1", "I;16") else "RGB"))))
        sizes = {}
        for f, _, a in loaded:
            sizes.setdefault(a.shape[:2], f)
        if len(sizes) > 1:
            listing = "; ".join(f"{h}x{w} (e.g. {f.name})" for (h, w), f in sizes.items())
            raise ValueError(f"{what} folder {path} mixes image sizes: {listing}. Resize them to one size first")
        grey = all(a.ndim == 2 for _, _, a in loaded)
        arrays = [a[..., None] if grey else (np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a) for _, _, a in loaded]
        images, groups = np.stack(arrays).astype(np.uint8), None
    if len(images) == 0:
        raise ValueError(f"{what} {path} holds no images")
    return images, groups


def _unique(images: np.ndarray, groups):
    """Byte-identical training images once: a repeated image would be its own second neighbour."""
    flat = images.reshape(len(images), -1)
    _, first = np.unique(flat, axis=0, return_index=True)
    first = np.sort(first)
    return images[first], (None if groups is None else np.asarray(groups)[first])


def audit(train_path, samples_path, space: str = "pixels", ratio: float = DEFAULT_RATIO,
          threshold: float = SSCD_THRESHOLD, sscd_weights=None, preprocessing: str = "official",
          figure=None, count: int = 16, device: str = "auto") -> dict:
    """Memorization statistics of the samples against the training images, in pixel or SSCD space."""
    from .embed import DISTANCE_SCALE, embed
    from .search import most_similar, nearest_neighbours
    from .figures import pair_grid

    train, groups = read_images(train_path, "training set")
    samples, _ = read_images(samples_path, "sample set")
    if train.shape[1:] != samples.shape[1:]:
        raise ValueError(f"samples are {samples.shape[1:]} (HWC) but training images are {train.shape[1:]}: "
                         "compare images of one size and channel count")
    train, groups = _unique(train, groups)
    result = {"train": str(train_path), "samples": str(samples_path), "space": space,
              "n_train_unique": int(len(train)), "n_samples": int(len(samples))}
    if space == "pixels":
        if len(train) < 2:
            raise ValueError("the L2 ratio criterion needs at least 2 distinct training images")
        idx, dist = nearest_neighbours(embed(samples, "pixels"), embed(train, "pixels"), k=2, device=device)
        dist = dist * DISTANCE_SCALE["pixels"]
        flagged = l2_ratio_memorized(dist[:, 0], dist[:, 1], ratio)
        score = dist[:, 0] / dist[:, 1]
        order = np.argsort(score, kind="stable")
        result.update(criterion=f"d1 < {ratio:.4g} * d2 (true L2 distances, unique training images)",
                      mem_ratio=float(flagged.mean()), ratio=ratio,
                      ratio_median=float(np.median(score)), nn1_distance_median=float(np.median(dist[:, 0])))
        if groups is not None:
            g = np.asarray(groups)[idx[:, 0]]
            result["by_group"] = {str(k): {"n_samples": int((g == k).sum()), "mem_ratio": float(flagged[g == k].mean())}
                                  for k in sorted(set(g.tolist()))}
        nearest = idx[:, 0]
    elif space == "sscd":
        if sscd_weights is None:
            raise ValueError("the sscd space needs --sscd-weights, the SSCD TorchScript file (rule fetch_sscd)")
        from .embed import sscd

        dev = None if device == "auto" else device
        nearest, sim = most_similar(sscd(samples, sscd_weights, preprocessing, device=dev),
                                    sscd(train, sscd_weights, preprocessing, device=dev), device=device)
        flagged = sim > threshold
        order = np.argsort(-sim, kind="stable")
        result.update(criterion=f"cosine similarity of SSCD descriptors > {threshold}", preprocessing=preprocessing,
                      **similarity_summary(sim, None if groups is None else np.asarray(groups)[nearest], threshold))
    else:
        raise ValueError(f"unknown space {space!r}; available: pixels, sscd")
    top = order[:count]
    result["most_copied"] = [{"sample": int(i), "nearest_train": int(nearest[i]), "flagged": bool(flagged[i])} for i in top]
    if figure is not None:
        pair_grid(samples[top], train[nearest[top]], flagged[top], figure)
    return result


def run_audit(args) -> int:
    """The CLI: write the JSON (and figure), and return 1 when --fail-above is given and exceeded."""
    ratio = DEFAULT_RATIO if args.ratio is None else args.ratio
    threshold = SSCD_THRESHOLD if args.threshold is None else args.threshold
    result = audit(args.train, args.samples, args.space, ratio, threshold, args.sscd_weights,
                   args.preprocessing, args.figure, args.count, args.device)
    failed = args.fail_above is not None and result["mem_ratio"] > args.fail_above
    result["fail_above"] = args.fail_above
    result["passed"] = not failed
    write_json(args.out, result)
    log.info("audit: %.2f%% of %d samples flagged (%s)%s", 100 * result["mem_ratio"], result["n_samples"],
             result["criterion"], f"; above the gate of {100 * args.fail_above:.2f}%" if failed else "")
    return 1 if failed else 0
