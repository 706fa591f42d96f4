"""Yardsticks: sample sets that are not generated, measured by the same code as every model.

A memorization rate or a Frechet distance means little alone. Beside every model a table shows:
- `real`: real images of the dataset held out of every configured training subset (what a model
  that generalises perfectly scores: the quality floor, and the memorization a fresh draw shows);
- `replay`: the model's own training set replayed, drawn with its repeats (what a pure memorizer
  scores);
- `blur`: the held-out real images blurred with a Gaussian of `blur_sigma` pixels (what a model
  that draws the right content without its detail scores);
- `train`: the unique training images, each searched against the *other* training images
  (leave-one-out): what "similar" and "memorized" mean among the training images themselves, e.g.
  near-duplicates in the data that a model could reproduce without copying any one of them.
  Small subsets are cycled to the same number of rows, so every image weighs (almost) equally.
They are written as sample shards with a manifest, so search, metrics and tables read them like
any model's samples. The held-out reserve is the same for every subset of a dataset and is never
used to train the digits classifier that judges quality (see `heldout_split`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from . import replicates
from .data import Subset
from .io import write_image_table
from .shards import OWN_INDEX, shard_range, write_manifest

log = logging.getLogger(__name__)

KINDS = ("real", "replay", "blur", "train")
SAMPLER = "data"  # the sampler slot of a yardstick's sample directory: results/samples/<kind>~<subset>/data/
SEP = "~"         # never part of a configured name
LABELS = {"real": "Real held-out", "replay": "Training replay", "blur": "Real held-out, blurred",
          "train": "Train vs train (leave-one-out)"}


def yardstick_id(kind: str, subset: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown yardstick {kind!r}; available: {KINDS}")
    return f"{kind}{SEP}{subset}"


def parse_id(model: str) -> tuple[str, str] | None:
    """(kind, subset) of a yardstick id or of one of its replicates (`real~digits-48.r1`), None for a model name."""
    kind, sep, subset = model.partition(SEP)
    return (kind, replicates.split(subset)[0]) if sep and kind in KINDS else None


# Yardsticks with replicates: the replay draws its images with replacement from the training set, a
# draw each replicate repeats afresh. The real and blurred held-out images come from the held-out
# reserve: with a reserve of exactly `num_samples` images (the default) they are the whole reserve, one
# fixed set, since a fresh draw of the same size would need held-out images the digits classifier trains
# on, and a bootstrap resample adds its own noise to a Frechet distance (duplicates: on the embedded
# digits it raised the real images' digits-FD from 7 to about 20). With a larger reserve
# (`yardsticks.reserve`), replicate r >= 1 draws its `num_samples` images from the reserve without
# replacement, so each replicate's held-out set is a resample of the reserve that repeats no image and
# still lies outside every training subset and the classifier's images (REPLICATED_WITH_RESERVE). Train
# vs train shows every unique training image and stays one set.
REPLICATED = ("replay",)
REPLICATED_WITH_RESERVE = ("replay", "real", "blur")


def replicated_kinds(reserve: int, num_samples: int) -> tuple[str, ...]:
    """The yardstick kinds that have one set per replicate, given the held-out reserve's size."""
    return REPLICATED_WITH_RESERVE if reserve > num_samples else REPLICATED


def heldout_split(num_images: int, excluded: Sequence[np.ndarray], reserve: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the images no training subset uses into a reserve for the real yardsticks and the rest.

    The rest is what a quality network (the digits classifier) may train on, so it never judges
    images it has seen: neither a training image nor a held-out yardstick image.
    """
    used = np.unique(np.concatenate([np.asarray(e, dtype=np.int64) for e in excluded])) if excluded else np.empty(0, np.int64)
    pool = np.setdiff1d(np.arange(num_images), used)
    if len(pool) < reserve:
        raise ValueError(f"only {len(pool)} images lie outside every training subset, the real yardsticks need "
                         f"{reserve}: lower yardsticks.num_samples or the subset sizes")
    perm = np.random.default_rng([seed, 7]).permutation(pool)
    return np.sort(perm[:reserve]), np.sort(perm[reserve:])


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over height and width only (scipy.ndimage), rounded back to uint8."""
    from scipy.ndimage import gaussian_filter

    out = gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma, 0), mode="reflect")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def yardstick_rows(kind: str, subset: Subset, reserve: np.ndarray, num_samples: int, seed: int, replicate: int = 0
                   ) -> tuple[str, np.ndarray, np.ndarray | None]:
    """Which images a yardstick shows: ("source", dataset rows) for real and blur, ("subset", subset rows)
    for replay and train, and for train the index of each row's own unique training image (which its
    nearest-neighbour search skips). Replicate r >= 1 of the replay is a fresh draw from the training set
    (see REPLICATED), and replicate r >= 1 of real and blur a draw without replacement from a reserve larger
    than `num_samples` (REPLICATED_WITH_RESERVE)."""
    kinds = replicated_kinds(len(reserve), num_samples)
    if replicate and kind not in kinds:
        raise ValueError(f"the {kind!r} yardstick has no replicates (asked for {replicate}) with a held-out reserve "
                         f"of {len(reserve)} images for {num_samples} samples: {kinds} only")
    if kind in ("real", "blur"):
        if len(reserve) < num_samples:
            raise ValueError(f"the held-out reserve has {len(reserve)} images, the yardstick needs {num_samples}")
        if replicate:
            rows = np.random.default_rng([seed, 17, replicate]).choice(np.asarray(reserve, np.int64), num_samples, replace=False)
            return "source", np.sort(rows), None
        return "source", np.asarray(reserve[:num_samples], np.int64), None
    if kind == "replay":
        rng = np.random.default_rng([seed, 11] + ([replicate] if replicate else []))
        return "subset", rng.choice(subset.expanded_indices(), num_samples, replace=True), None
    if kind == "train":
        if len(subset) < 3:
            raise ValueError(f"the train-vs-train yardstick needs at least 3 unique training images, got {len(subset)}")
        perm = np.random.default_rng([seed, 13]).permutation(len(subset))
        rows = np.resize(perm, num_samples).astype(np.int64)  # every image once before any twice
        return "subset", rows, rows
    raise ValueError(f"unknown yardstick {kind!r}; available: {KINDS}")


def yardstick_images(kind: str, images: np.ndarray, labels: np.ndarray, subset: Subset, reserve: np.ndarray,
                     num_samples: int, seed: int, blur_sigma: float = 1.0, replicate: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The `num_samples` images and labels of one yardstick, and for `train` the index of each row's own
    unique training image. `images` may be any object that returns the images of an index array (a
    captioned source reads only those)."""
    where, rows, own = yardstick_rows(kind, subset, reserve, num_samples, seed, replicate)
    if where == "subset":
        return subset.images[rows], subset.labels[rows], own
    out = images[rows]
    return (blur(out, blur_sigma) if kind == "blur" else out), labels[rows], own


def yardstick_prompts(kind: str, prompts, subset: Subset, reserve: np.ndarray, num_samples: int, seed: int,
                      replicate: int = 0) -> list[str]:
    """The prompt of each yardstick image, for image-prompt datasets: real pairs keep their captions, so
    a CLIP score and the text-to-image similarity statistics have yardsticks too."""
    where, rows, _ = yardstick_rows(kind, subset, reserve, num_samples, seed, replicate)
    source = subset.prompts if where == "subset" else prompts
    return [str(source[i]) for i in rows]


def write_yardstick(kind: str, subset_name: str, images: np.ndarray, labels: np.ndarray, out_dir: str | Path,
                    shard_size: int, own_index: np.ndarray | None = None, prompts: list[str] | None = None) -> dict:
    """Shards and manifest in the layout of generated samples (nfe 0: nothing was generated); rows that
    are training images carry their index in the `own_train_index` column (see search.py)."""
    out_dir = Path(out_dir)
    n = len(images)
    if n < 2:
        raise ValueError(f"a yardstick needs at least 2 images, got {n}")
    model = yardstick_id(kind, subset_name)
    paths = []
    for k in range((n + shard_size - 1) // shard_size):
        rows = shard_range(k, shard_size, n)
        path = out_dir / f"shard-{k:05d}.parquet"
        columns = {
            "sample_id": np.arange(rows.start, rows.stop, dtype=np.int64),
            "seed": np.full(len(rows), -1, dtype=np.int64),
            "label": labels[rows.start:rows.stop].astype(np.int64),
            "model": [model] * len(rows),
            "sampler": [SAMPLER] * len(rows),
            "nfe": np.zeros(len(rows), dtype=np.int64),
        }
        if own_index is not None:
            columns[OWN_INDEX] = np.asarray(own_index[rows.start:rows.stop], dtype=np.int64)
        if prompts is not None:
            columns["prompt"] = prompts[rows.start:rows.stop]
        write_image_table(path, images[rows.start:rows.stop], columns, {"model": model, "sampler": SAMPLER, "yardstick": kind})
        paths.append(path)
    manifest = write_manifest(paths, out_dir / "manifest.json", shard_size, n)
    log.info("yardstick %s: %d images in %d shards", model, n, len(paths))
    return manifest
