"""Training subsets: which source images a model sees, and how many times each one.

A subset stores each distinct image once with a `repeat` count rather than storing copies, so
nearest-neighbour memorization search counts a repeated image once while training still sees it
`repeat` times (via `expanded_indices`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from pipeline.io import CorruptFileError, read_image_table, write_image_table

SUBSET_COLUMNS = ("index", "label", "repeat", "group")
PROMPT = "prompt"  # the column of a text-to-image subset: each image's caption
HELD_OUT = "held_out_prompts"  # metadata key of a text-to-image subset: prompts to sample beside its own


@dataclass
class Subset:
    """Unique images of a training set with their source index, label, repeat count and group, and for
    a text-to-image set each image's prompt."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    repeat: np.ndarray
    group: np.ndarray
    prompts: np.ndarray | None = None
    held_out_prompts: list[str] | None = None  # prompts of pairs outside the set, for sampling beside its own

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.uint8)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.index = np.asarray(self.index, dtype=np.int64)
        self.repeat = np.asarray(self.repeat, dtype=np.int64)
        self.group = np.asarray(self.group, dtype=str)
        if self.prompts is not None:
            self.prompts = np.asarray(self.prompts, dtype=object)
        n = len(self.images)
        if self.images.ndim != 4:
            raise ValueError(f"subset images must be NHWC, got shape {self.images.shape}")
        for name in ("labels", "index", "repeat", "group") + (("prompts",) if self.prompts is not None else ()):
            if len(getattr(self, name)) != n:
                raise ValueError(f"subset {name} has {len(getattr(self, name))} rows, images have {n}")
        if n and self.repeat.min() < 1:
            raise ValueError("subset repeat counts must be >= 1")

    def __len__(self) -> int:
        return len(self.images)

    def expanded_indices(self) -> np.ndarray:
        """Row positions with each row repeated `repeat` times: the list one training epoch walks."""
        return np.repeat(np.arange(len(self), dtype=np.int64), self.repeat)


def build_subset(images: np.ndarray, labels: np.ndarray, spec: dict, exclude: np.ndarray | None = None) -> Subset:
    """Select a subset of (images, labels) as described by `spec` (kind "uniform" or "repetition").

    Selection depends only on the spec, its seed and `exclude`, so rebuilding gives the identical
    subset. `exclude`: source indices a uniform subset must not draw (the indices of the subsets its
    spec names in `disjoint_from`: a yardstick model that shares no training image with another).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    kind = spec.get("kind")
    if spec.get("disjoint_from") and exclude is None:
        raise ValueError(f"the subset must be disjoint from {spec['disjoint_from']}: give their source indices "
                         "(`pipeline subset --disjoint-from <their subset files>`)")
    rng = np.random.default_rng(_require(spec, "seed"))
    if kind == "uniform":
        n = int(_require(spec, "n"))
        if not 0 <= n <= len(labels):
            raise ValueError(f"uniform subset asks for n={n} images but the dataset has {len(labels)}")
        pool = np.setdiff1d(np.arange(len(labels)), np.asarray([] if exclude is None else exclude, dtype=np.int64))
        if n > len(pool):
            raise ValueError(f"uniform subset asks for n={n} images but only {len(pool)} of the dataset's {len(labels)} "
                             "lie outside the subsets it must be disjoint from")
        chosen = pool[rng.choice(len(pool), size=n, replace=False)]
        repeat = np.ones(n, dtype=np.int64)
        group = np.full(n, "uniform")
    elif kind == "repetition":
        if exclude is not None and len(exclude):
            raise ValueError("only uniform subsets can be drawn disjoint from others (`disjoint_from`)")
        chosen, repeat, group = _repetition(labels, spec, rng)
    else:
        raise ValueError(f"unknown subset kind {kind!r}; known kinds: repetition, uniform")
    return _collapse_duplicates(images, labels, np.asarray(chosen, dtype=np.int64), repeat, group)


def _require(spec: dict, key: str):
    if key not in spec:
        raise ValueError(f"subset spec {spec!r} is missing {key!r}")
    return spec[key]


def _repetition(labels: np.ndarray, spec: dict, rng: np.random.Generator):
    """K images of each repeated class seen R times, plus singles from the remaining classes: M in
    all (`others`) or M from each (`others_per_class`).

    This is the localized-memorization setting (50 CIFAR images of classes 0 and 1 repeated 5x plus
    1000 from classes 2-9; on ImageNet 5 anchors of each of 50 classes repeated 10x plus 50 images of
    each other class), where memorization should concentrate on the repeated group.
    """
    classes = [int(c) for c in _require(spec, "repeated_classes")]
    per_class = int(_require(spec, "per_class"))
    repeats = int(_require(spec, "repeats"))
    others = spec.get("others")
    others_per_class = spec.get("others_per_class")
    if (others is None) == (others_per_class is None):
        raise ValueError(f"repetition spec needs exactly one of others or others_per_class: {spec!r}")
    if repeats < 1 or per_class < 0 or (others is not None and others < 0):
        raise ValueError(f"repetition spec needs repeats >= 1, per_class >= 0, others >= 0: {spec!r}")
    chosen, repeat, group = [], [], []
    for c in classes:
        pool = np.flatnonzero(labels == c)
        if per_class > len(pool):
            raise ValueError(f"class {c} has {len(pool)} images, repetition spec asks for per_class={per_class}")
        chosen.append(rng.choice(pool, size=per_class, replace=False))
        repeat.append(np.full(per_class, repeats, dtype=np.int64))
        group.append(np.full(per_class, "repeated"))
    if others is not None:
        pool = np.flatnonzero(~np.isin(labels, classes))
        if others > len(pool):
            raise ValueError(f"only {len(pool)} images outside classes {classes}, repetition spec asks for others={others}")
        singles = rng.choice(pool, size=int(others), replace=False)
    else:
        # ImageNet's design: a fixed number of single images from every class that is not repeated
        singles = []
        for c in np.setdiff1d(np.unique(labels), classes):
            pool = np.flatnonzero(labels == c)
            if others_per_class > len(pool):
                raise ValueError(f"class {c} has {len(pool)} images, repetition spec asks for "
                                 f"others_per_class={others_per_class}")
            singles.append(rng.choice(pool, size=int(others_per_class), replace=False))
        singles = np.concatenate(singles) if singles else np.zeros(0, dtype=np.int64)
    chosen.append(singles)
    repeat.append(np.ones(len(singles), dtype=np.int64))
    group.append(np.full(len(singles), "non_repeated"))
    return np.concatenate(chosen), np.concatenate(repeat), np.concatenate(group)


def build_text_subset(memorized, extra, spec: dict, same_source: bool) -> Subset:
    """The text-to-image memorization set (Section 4.1, after Somepalli et al. 2023 and Wen et al. 2024):
    `n` image-prompt pairs of `memorized` each seen `repeats` times (group "memorized") plus
    `extra_ratio` x n pairs of `extra` seen once (group "extra"; the study adds 3, 4 or 5 x 200 COCO
    pairs). Both are CaptionedSources; with `same_source` the extras never repeat a memorized pair.
    Rows: the memorized pairs, then the extras, each in source order; `index` is the row in its source."""
    rng = np.random.default_rng(_require(spec, "seed"))
    n, repeats = int(_require(spec, "n")), int(_require(spec, "repeats"))
    m = int(round(float(_require(spec, "extra_ratio")) * n))
    if not 0 < n <= len(memorized):
        raise ValueError(f"text memorization subset asks for n={n} pairs, the memorized source has {len(memorized)}")
    mem = np.sort(rng.choice(len(memorized), size=n, replace=False))
    pool = np.setdiff1d(np.arange(len(extra)), mem) if same_source else np.arange(len(extra))
    if m > len(pool):
        raise ValueError(f"extra_ratio {spec['extra_ratio']} asks for {m} extra pairs, the extra source has {len(pool)}"
                         + (" besides the memorized ones" if same_source else ""))
    ext = np.sort(rng.choice(pool, size=m, replace=False))
    held_out = _held_out_prompts(memorized, np.union1d(mem, ext) if same_source else mem,
                                 [memorized.prompts[i] for i in mem] + [extra.prompts[i] for i in ext],
                                 int(spec.get("held_out_prompts", 0)), rng)
    images = np.concatenate([memorized.read(mem), extra.read(ext)]) if m else memorized.read(mem)
    labels = np.concatenate([memorized.labels[mem], extra.labels[ext]])
    prompts = [memorized.prompts[i] for i in mem] + [extra.prompts[i] for i in ext]
    repeat = np.concatenate([np.full(n, repeats, np.int64), np.ones(m, np.int64)])
    group = np.concatenate([np.full(n, "memorized"), np.full(m, "extra")])
    rows = np.arange(n + m)
    subset = _collapse_duplicates(images, labels, rows, repeat, group, np.asarray(prompts, dtype=object),
                                  repeated_group="memorized")
    subset.index = np.concatenate([mem, ext])[subset.index]
    subset.held_out_prompts = held_out
    return subset


def _held_out_prompts(source, used: np.ndarray, seen: list[str], k: int, rng: np.random.Generator) -> list[str]:
    """`k` distinct prompts of `source` pairs outside the set whose text the set never trained on (digits
    captioned by class share their few captions, so a miniature may have fewer, or none), in source order."""
    if k <= 0:
        return []
    seen_text = set(seen)
    first: dict[str, int] = {}
    for i in np.setdiff1d(np.arange(len(source)), used):
        text = source.prompts[i]
        if text not in seen_text and text not in first:
            first[text] = int(i)
    pool = sorted(first.values())
    if len(pool) < k:
        raise ValueError(f"held_out_prompts asks for {k} prompts; the source has {len(pool)} outside the set "
                         f"that the set never trained on")
    return [source.prompts[i] for i in np.sort(rng.choice(pool, size=k, replace=False))]


def _collapse_duplicates(images, labels, chosen, repeat, group, prompts=None, repeated_group="repeated") -> Subset:
    """Merge byte-identical images into one row (smallest source index, summed repeats; the first
    copy's prompt).

    A merged row is in `repeated_group` if any of its copies was, since it is then seen more than once.
    Rows come out sorted by source index so the written file does not depend on draw order.
    """
    order = np.argsort(chosen, kind="stable")
    chosen, repeat, group = chosen[order], repeat[order], group[order]
    first: dict[bytes, int] = {}
    keep: list[int] = []
    repeat = repeat.copy()
    group = group.astype(object)
    for pos, src in enumerate(chosen):
        key = np.ascontiguousarray(images[src]).tobytes()
        if key in first:
            row = first[key]
            repeat[row] += repeat[pos]
            if group[row] != group[pos]:
                group[row] = repeated_group
        else:
            first[key] = pos
            keep.append(pos)
    keep_arr = np.asarray(keep, dtype=np.int64)
    idx = chosen[keep_arr]
    return Subset(
        images=np.asarray(images)[idx] if len(idx) else np.zeros((0, *np.shape(images)[1:]), np.uint8),
        labels=labels[idx],
        index=idx,
        repeat=repeat[keep_arr],
        group=np.asarray(group[keep_arr].tolist(), dtype=str),
        prompts=None if prompts is None else np.asarray(prompts, dtype=object)[order][keep_arr],
    )


def write_subset(path: str | os.PathLike, subset: Subset, metadata: dict | None = None) -> None:
    """Write a subset as an image table (atomically) with index, label, repeat and group columns."""
    write_image_table(
        path,
        subset.images,
        {
            "index": subset.index,
            "label": subset.labels,
            "repeat": subset.repeat,
            "group": [str(g) for g in subset.group],
            **({PROMPT: [str(p) for p in subset.prompts]} if subset.prompts is not None else {}),
        },
        {**(metadata or {}),
         **({HELD_OUT: json.dumps(subset.held_out_prompts)} if subset.held_out_prompts is not None else {})},
    )


def read_subset(path: str | os.PathLike) -> Subset:
    """Read a subset written by `write_subset`; CorruptFileError if a subset column is missing."""
    images, table, meta = read_image_table(path)
    missing = [c for c in SUBSET_COLUMNS if c not in table.column_names]
    if missing:
        raise CorruptFileError(f"{path}: not a subset file, missing column(s) {missing}")
    col = {c: table.column(c).to_numpy(zero_copy_only=False) for c in SUBSET_COLUMNS}
    return Subset(
        images=images,
        labels=col["label"],
        index=col["index"],
        repeat=col["repeat"],
        group=np.asarray(col["group"].tolist(), dtype=str),
        prompts=np.asarray(table.column(PROMPT).to_pylist(), dtype=object) if PROMPT in table.column_names else None,
        held_out_prompts=json.loads(meta[HELD_OUT]) if HELD_OUT in meta else None,
    )
