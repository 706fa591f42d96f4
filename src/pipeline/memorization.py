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
)


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


def memorization_table(
    indices,
    distances,
    train_group,
    train_label,
    sample_ids,
    ratio: float = DEFAULT_RATIO,
) -> pa.Table:
    """One row per generated sample: its two nearest unique training images and the verdict.

    `indices`/`distances` come from `search.nearest_neighbours` (k >= 2) run against the
    deduplicated training set; `train_group`/`train_label` are indexed by that set's rows.
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
        }
    )


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

    by_group: dict = {}
    for group in sorted(set(groups), key=lambda g: (str(type(g)), g)):
        mask = np.fromiter((g == group for g in groups), dtype=bool, count=len(groups))
        by_group[group] = {
            "n_samples": int(mask.sum()),
            "mem_ratio": float(memorized[mask].mean()),
        }
    return {
        "n_samples": int(table.num_rows),
        "mem_ratio": float(memorized.mean()),
        "ratio_mean": float(ratio.mean()),
        "ratio_median": float(np.median(ratio)),
        "ratio_p05": float(np.percentile(ratio, 5)),
        "nn1_distance_median": float(np.median(nn1)),
        "by_group": by_group,
    }


SSCD_THRESHOLD = 0.5  # the copy threshold of Somepalli et al. (2023) and the study (Section 4.1)


def similarity_summary(similarity, groups=None, threshold: float = SSCD_THRESHOLD) -> dict:
    """The study's SSCD statistics of nearest-neighbour similarities: share above `threshold`
    ("SSCD Mem"), p95, mean and max, overall and per group tag of the nearest training image."""
    sim = np.asarray(similarity, dtype=np.float64)
    if sim.ndim != 1 or sim.size == 0:
        raise ValueError("need a non-empty 1-D array of similarities")

    def stats(v):
        return {"n_samples": int(v.size), "mem_ratio": float((v > threshold).mean()),
                "p95": float(np.percentile(v, 95)), "mean": float(v.mean()), "max": float(v.max())}

    out = {**stats(sim), "threshold": threshold}
    if groups is not None:
        groups = np.asarray(groups)
        out["by_group"] = {str(g): stats(sim[groups == g]) for g in sorted(set(groups.tolist()))}
    return out
