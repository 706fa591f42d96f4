"""The L2 ratio memorization criterion (Yoon et al. 2023; Gu et al. 2025).

A generated sample is memorized when d1 < d2 * ratio (ratio = 1/3 by default), where d1 and d2
are the true Euclidean distances to its nearest and second-nearest UNIQUE training images.
The training set must be deduplicated (e.g. `np.unique(train, axis=0)`) before the search:
with a repeated image the two nearest neighbours coincide, d2 == d1, and a verbatim copy of a
repeated image could never count as memorized. A zero second distance can only come from
such duplicates, so it is rejected instead of silently reported as "not memorized".
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

DEFAULT_RATIO = 1.0 / 3.0

COLUMNS = (
    "sample_id",
    "nn1_index",
    "nn1_distance",
    "nn2_index",
    "nn2_distance",
    "ratio",
    "memorized",
    "nn1_group",
    "nn1_label",
    "label",
    "label_group",
)
UNLABELLED = -1  # the `label` of a sample generated without a class (an unconditional model)
UNSEEN = "unseen"  # the class group of a label no training image carries


def l2_ratio_memorized(d1, d2, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """Boolean mask d1 < d2 * ratio (strict: a sample exactly on the boundary is not memorized)."""
    d1 = np.asarray(d1, dtype=np.float64)
    d2 = np.asarray(d2, dtype=np.float64)
    if d1.shape != d2.shape:
        raise ValueError(f"d1 and d2 shapes differ: {d1.shape} vs {d2.shape}")
    if not (0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not (np.isfinite(d1).all() and np.isfinite(d2).all()):
        raise ValueError("distances contain NaN/inf")
    if (d1 < 0).any():
        raise ValueError("distances must be non-negative")
    if (d1 > d2).any():
        raise ValueError("d1 must not exceed d2 (distances must be sorted ascending)")
    if (d2 == 0).any():
        raise ValueError(
            f"{int((d2 == 0).sum())} sample(s) have second-nearest distance 0: the training "
            "set contains duplicate images; deduplicate it (np.unique(axis=0)) before the search"
        )
    return d1 < d2 * ratio


def _per_train_column(values, name: str, indices: np.ndarray) -> pa.Array:
    values = np.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per training image)")
    if indices.size and indices.max() >= len(values):
        raise ValueError(
            f"neighbour index {int(indices.max())} out of range for {name} of length {len(values)}"
        )
    return pa.array(values[indices])


def class_groups(train_group, train_label) -> dict[int, str]:
    """The group of each class of a training set: "repeated" if any of its images is repeated, else the
    commonest group of its images ("uniform", "non_repeated"). A class-conditional sample belongs to
    the group of the class it was generated for: Table 4's repeated and non-repeated classes."""
    groups: dict[int, list[str]] = {}
    for g, c in zip(np.asarray(train_group).tolist(), np.asarray(train_label).tolist()):
        groups.setdefault(int(c), []).append(str(g))
    return {c: "repeated" if "repeated" in gs else max(sorted(set(gs)), key=gs.count) for c, gs in groups.items()}


def label_groups(sample_labels, train_group, train_label) -> pa.Array:
    """The class group of each sample's label (`class_groups` of the training set; null for an
    unlabelled sample, UNSEEN for a class no training image has)."""
    groups = class_groups(train_group, train_label)
    return pa.array([None if int(c) == UNLABELLED else groups.get(int(c), UNSEEN)
                     for c in np.asarray(sample_labels).tolist()], pa.string())


def memorization_table(
    indices,
    distances,
    train_group,
    train_label,
    sample_ids,
    ratio: float = DEFAULT_RATIO,
    sample_labels=None,
) -> pa.Table:
    """One row per generated sample: its two nearest unique training images and the verdict.

    `indices`/`distances` come from `search.nearest_neighbours` (k >= 2) run against the
    deduplicated training set; `train_group`/`train_label` are indexed by that set's rows.
    `sample_labels`: each sample's own class (UNLABELLED = -1 without one), with the group of
    that class beside it (`class_groups`).
    """
    indices = np.asarray(indices)
    distances = np.asarray(distances, dtype=np.float64)
    if indices.ndim != 2 or indices.shape[1] < 2:
        raise ValueError(f"indices must be (n, k>=2), got shape {indices.shape}")
    if distances.shape != indices.shape:
        raise ValueError(f"distances shape {distances.shape} != indices shape {indices.shape}")
    if not np.issubdtype(indices.dtype, np.integer) or (indices < 0).any():
        raise ValueError("indices must be non-negative integers")
    sample_ids = np.asarray(sample_ids)
    if sample_ids.shape != (indices.shape[0],):
        raise ValueError(f"sample_ids must have length {indices.shape[0]}, got {sample_ids.shape}")

    labels = np.full(len(sample_ids), UNLABELLED, np.int64) if sample_labels is None else np.asarray(sample_labels, np.int64)
    if labels.shape != sample_ids.shape:
        raise ValueError(f"sample_labels must have length {len(sample_ids)}, got {labels.shape}")

    idx1 = indices[:, 0].astype(np.int64)
    idx2 = indices[:, 1].astype(np.int64)
    d1, d2 = distances[:, 0], distances[:, 1]
    memorized = l2_ratio_memorized(d1, d2, ratio)
    return pa.table(
        {
            "sample_id": pa.array(sample_ids),
            "nn1_index": pa.array(idx1),
            "nn1_distance": pa.array(d1),
            "nn2_index": pa.array(idx2),
            "nn2_distance": pa.array(d2),
            "ratio": pa.array(d1 / d2),
            "memorized": pa.array(memorized),
            "nn1_group": _per_train_column(train_group, "train_group", idx1),
            "nn1_label": _per_train_column(train_label, "train_label", idx1),
            "label": pa.array(labels),
            "label_group": label_groups(labels, train_group, train_label),
        }
    )


def _grouped(keys, values, stats) -> dict:
    """`stats(values[rows])` for the rows of each key, keys as strings in sorted order."""
    keys = np.asarray(keys)
    return {str(k): stats(values[keys == k]) for k in sorted(set(keys.tolist()))}


def _class_stats(table: pa.Table, values: np.ndarray, stats) -> dict:
    """Per-class figures of class-labelled samples: by the sample's own class (`by_label`), by the group
    of that class (`by_class_group`), and the share whose nearest training image is of that class
    (`nn1_same_class`; for real images, pixel-space 1-NN classification accuracy). Empty when any
    sample is unlabelled (an unconditional model)."""
    if "label" not in table.column_names:
        return {}
    labels = table.column("label").to_numpy()
    if len(labels) == 0 or (labels == UNLABELLED).any():
        return {}
    out = {"by_label": _grouped(labels, values, stats),
           "by_class_group": _grouped(np.asarray(table.column("label_group").to_pylist()), values, stats)}
    if "nn1_label" in table.column_names:
        out["nn1_same_class"] = float((table.column("nn1_label").to_numpy() == labels).mean())
    return out


def summarize(table: pa.Table) -> dict:
    """JSON-ready summary: memorized fraction, d1/d2 distribution, and per-group memorization.

    Per-group numbers group samples by the group tag of their nearest training image, so a
    localized-memorization setting (repeated vs. non-repeated classes) is read off directly.
    """
    needed = ("memorized", "ratio", "nn1_distance", "nn1_group")
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"table lacks columns {missing}")
    if table.num_rows == 0:
        raise ValueError("cannot summarize an empty memorization table")
    memorized = np.asarray(table.column("memorized").to_numpy(zero_copy_only=False), dtype=bool)
    ratio = np.asarray(table.column("ratio").to_numpy(zero_copy_only=False), dtype=np.float64)
    nn1 = np.asarray(table.column("nn1_distance").to_numpy(zero_copy_only=False), dtype=np.float64)
    groups = table.column("nn1_group").to_pylist()

    def stats(flags):
        return {"n_samples": int(flags.size), "mem_ratio": float(flags.mean())}

    meta = table.schema.metadata or {}
    return {
        "n_samples": int(table.num_rows),
        "criterion_ratio": float(meta[b"ratio"]) if b"ratio" in meta else None,  # search writes it
        "mem_ratio": float(memorized.mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_median": float(np.median(ratio)),
        "ratio_p05": float(np.percentile(ratio, 5)),
        "nn1_distance_median": float(np.median(nn1)),
        "by_group": _grouped(np.asarray(groups, dtype=str), memorized, stats),
        **_class_stats(table, memorized, stats),
    }


SSCD_THRESHOLD = 0.5  # the copy threshold of Somepalli et al. (2023) and the study (Section 4.1)


def calibrated_threshold(heldout_similarity, quantile: float) -> float:
    """The copy threshold at which real held-out images (never trained on) exceed it at most
    1 - `quantile` of the time: their similarity's `quantile`, taken as an observed value
    (numpy's `higher` method) so the share above it never exceeds 1 - quantile."""
    sim = np.asarray(heldout_similarity, dtype=np.float64)
    if sim.ndim != 1 or sim.size == 0:
        raise ValueError("need a non-empty 1-D array of held-out similarities")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie strictly between 0 and 1, got {quantile}")
    return float(np.quantile(sim, quantile, method="higher"))


def similarity_summary(similarity, groups=None, threshold: float = SSCD_THRESHOLD, table: pa.Table | None = None) -> dict:
    """The study's SSCD statistics of nearest-neighbour similarities: share above `threshold`
    ("SSCD Mem"), p95, mean and max, overall and per group tag of the nearest training image; with the
    similarity `table` of class-labelled samples, per class and class group too."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 1 or sim.size == 0:
        raise ValueError("need a non-empty 1-D array of similarities")

    def stats(v):
        return {"n_samples": int(v.size), "mem_ratio": float((v > threshold).mean()),
                "p95": float(np.percentile(v, 95)), "mean": float(v.mean()), "max": float(v.max())}

    out = {**stats(sim), "threshold": threshold}
    if groups is not None:
        out["by_group"] = _grouped(np.asarray(groups), sim, stats)
    if table is not None:
        out.update(_class_stats(table, sim, stats))
        if "gt_similarity" in table.column_names:
            out["text"] = _prompt_stats(table, stats)
    return out


def _prompt_stats(table: pa.Table, stats) -> dict:
    """Table 3's statistics of text-to-image samples: on the memorized prompts, similarity to the prompt's
    own training image (`own_image`) and to the most similar memorized image (`nearest_memorized`); on
    held-out prompts, the latter only (what similarity without the prompt's pair looks like)."""
    group = np.asarray(table.column("prompt_group").to_pylist(), dtype=object)
    gt = table.column("gt_similarity").to_numpy(zero_copy_only=False).astype(np.float64)
    nearest = table.column("memorized_similarity").to_numpy(zero_copy_only=False).astype(np.float64)
    out = {}
    mem = group == "memorized"
    if mem.any():
        out["memorized_prompts"] = {"own_image": stats(gt[mem]), "nearest_memorized": stats(nearest[mem])}
    if (~mem).any():
        out["held_out_prompts"] = {"nearest_memorized": stats(nearest[~mem])}
    return out
