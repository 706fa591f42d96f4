"""Files between stages: atomic writes and the Parquet image table shared by subsets and samples.

Every stage writes through `atomic_output` so that a killed job never leaves a half-written file
that Snakemake (or the next stage) would mistake for a finished one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_COLUMN = "image"
_SHAPE_KEY = b"memdistill.image_shape"


class CorruptFileError(RuntimeError):
    """A stage input that exists but cannot be trusted (truncated, wrong shape, wrong count)."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def pyplot():
    """matplotlib's pyplot on the file-only backend, imported when a figure is drawn (most jobs draw none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 110, **savefig_kwargs) -> None:
    """A figure to `path`, atomically."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, **savefig_kwargs)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds, so
    `path` holds a whole directory (a model, an extracted archive) or what it held before."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_image_table(
    path: str | os.PathLike,
    images: np.ndarray,
    columns: Mapping[str, np.ndarray | list],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write uint8 images (N, H, W, C) plus per-row columns as one Parquet file, atomically.

    Pixels are stored as raw bytes per row with the shape in the schema metadata, which keeps the
    file small and readable by any Parquet tool without a custom extension type.
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n = images.shape[0]
    arrays = {IMAGE_COLUMN: pa.array([img.tobytes() for img in images], type=pa.binary())}
    for name, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {name!r} has {len(values)} rows, images have {n}")
        arrays[name] = pa.array(values)
    meta = {_SHAPE_KEY: json.dumps(list(images.shape[1:])).encode()}
    for key, value in (metadata or {}).items():
        meta[key.encode()] = str(value).encode()
    table = pa.table(arrays).replace_schema_metadata(meta)
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


def read_image_table(path: str | os.PathLike, expected_rows: int | None = None):
    """Read a file written by `write_image_table`: returns (images uint8 NHWC, pyarrow.Table, metadata).

    Raises CorruptFileError naming the file when it is truncated, malformed or has the wrong size.
    """
    path = Path(path)
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged footer or page
        raise CorruptFileError(f"{path}: unreadable Parquet file ({exc}); delete it and rerun the rule that writes it") from exc
    meta = table.schema.metadata or {}
    if _SHAPE_KEY not in meta or IMAGE_COLUMN not in table.column_names:
        raise CorruptFileError(f"{path}: not an image table (missing {IMAGE_COLUMN!r} column or shape metadata)")
    shape = tuple(json.loads(meta[_SHAPE_KEY]))
    blobs = table.column(IMAGE_COLUMN).to_pylist()
    size = int(np.prod(shape))
    if any(b is None or len(b) != size for b in blobs):
        raise CorruptFileError(f"{path}: image bytes do not match shape {shape}")
    if expected_rows is not None and table.num_rows != expected_rows:
        raise CorruptFileError(f"{path}: {table.num_rows} rows, expected {expected_rows}")
    images = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape((table.num_rows, *shape)) if blobs else np.zeros((0, *shape), np.uint8)
    user_meta = {k.decode(): v.decode() for k, v in meta.items() if k != _SHAPE_KEY and not k.startswith(b"ARROW")}
    return images, table.drop_columns([IMAGE_COLUMN]), user_meta


def images_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC in [0, 255] -> float32 NCHW in [-1, 1], the range every network here sees."""
    return (images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5) - 1.0


def unit_to_images(x: np.ndarray) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC, rounding like EDM's image writer."""
    x = np.clip(np.rint((np.asarray(x, dtype=np.float64) + 1.0) * 127.5), 0, 255)
    return x.astype(np.uint8).transpose(0, 2, 3, 1)
