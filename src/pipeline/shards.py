"""Sample shards: which samples a shard holds, the manifest that vouches for a set of shards, reading them back.

Kept free of torch so the search and report stages (and Snakemake itself) can use it in light environments.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from .io import CorruptFileError, read_image_table, read_json, sha256_file, write_json

# Column of rows that are themselves unique training images (the train-vs-train yardstick): the index
# of that image, which the row's own nearest-neighbour search skips.
OWN_INDEX = "own_train_index"


def shard_range(shard: int, shard_size: int, num_samples: int) -> range:
    start = shard * shard_size
    if start >= num_samples:
        raise ValueError(f"shard {shard} starts at {start}, past the {num_samples} samples")
    return range(start, min(start + shard_size, num_samples))


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def write_manifest(shard_paths: Sequence[str | Path], out_path: str | Path, shard_size: int, num_samples: int) -> dict:
    """Check every shard (readable, right row count, contiguous sample ids) and record checksums."""
    entries, expected_start = [], 0
    for k, path in enumerate(shard_paths):
        expected = len(shard_range(k, shard_size, num_samples))
        _, table, meta = read_image_table(path, expected_rows=expected)
        ids = table.column("sample_id").to_numpy()
        if ids[0] != expected_start or not np.array_equal(ids, np.arange(expected_start, expected_start + expected)):
            raise CorruptFileError(f"{path}: sample ids do not continue from {expected_start}")
        expected_start += expected
        entries.append({"path": str(path), "rows": expected, "sha256": sha256_file(path)})
    manifest = {"num_samples": num_samples, "shard_size": shard_size, "shards": entries,
                "model": meta.get("model"), "sampler": meta.get("sampler"), "nfe": int(table.column("nfe")[0].as_py())}
    write_json(out_path, manifest)
    return manifest


def read_samples(manifest_path: str | Path, verify: bool = True):
    """All samples listed by a manifest, in sample-id order; checks checksums when `verify`."""
    manifest = read_json(manifest_path)
    images, tables = [], []
    for entry in manifest["shards"]:
        if verify and sha256_file(entry["path"]) != entry["sha256"]:
            raise CorruptFileError(f"{entry['path']}: checksum differs from {manifest_path}; rerun the sample rules")
        imgs, table, _ = read_image_table(entry["path"], expected_rows=entry["rows"])
        images.append(imgs)
        tables.append(table)
    return np.concatenate(images), pa.concat_tables(tables), manifest
