"""Exact k-nearest-neighbour search between generated samples and training images.

FAISS (an exact flat L2 index, on GPU when the faiss build has one) finds a short list of
candidates per query in float32; the candidates are then re-ranked by true Euclidean distance
computed in float64 from the original vectors. The re-rank matters because float32 squared
distances can swap near-ties, and the memorization criterion compares true distances.
"""
from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

import faiss

DEVICES = ("auto", "cpu", "cuda")
_RERANK_ELEMENTS = 1 << 24


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and can see at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "auto":
        return "cuda" if faiss_gpu_available() else "cpu"
    if device == "cuda" and not faiss_gpu_available():
        raise RuntimeError(
            "device='cuda' requested but this faiss build has no GPU support or sees no GPU "
            "(faiss-cpu is installed?); install faiss-gpu or use device='cpu'/'auto'"
        )
    return device


def _as_float32_matrix(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x32).all():
        raise ValueError(f"{name} contains NaN/inf values (or values outside float32 range)")
    return x32


def _build_index(database32: np.ndarray, device: str):
    """Exact flat L2 index; the GPU resources object is returned so it outlives the index."""
    index = faiss.IndexFlatL2(database32.shape[1])
    resources = None
    if device == "cuda":
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(database32)
    return index, resources


def _rerank(queries, database, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 distances to each query's candidates; keep the k best, ties by index.

    Works in row chunks so that the gathered (rows, candidates, dims) block stays small.
    """
    n, c = candidates.shape
    dim = database.shape[1]
    out_idx = np.empty((n, k), dtype=np.int64)
    out_dist = np.empty((n, k), dtype=np.float64)
    step = max(1, _RERANK_ELEMENTS // (c * dim))
    for start in range(0, n, step):
        stop = min(start + step, n)
        cand = candidates[start:stop]
        q = np.asarray(queries[start:stop], dtype=np.float64)
        y = np.asarray(database[cand.ravel()], dtype=np.float64).reshape(stop - start, c, dim)
        diff = y - q[:, None, :]
        dist = np.sqrt(np.einsum("rcd,rcd->rc", diff, diff))
        order = np.lexsort((cand, dist), axis=-1)[:, :k]
        out_idx[start:stop] = np.take_along_axis(cand, order, axis=1)
        out_dist[start:stop] = np.take_along_axis(dist, order, axis=1)
    return out_idx, out_dist


def nearest_neighbours(
    queries,
    database,
    k: int = 2,
    candidates: int = 16,
    device: str = "auto",
    batch_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows for every query row, by true Euclidean distance.

    Returns (indices int64 (n, k), distances float64 (n, k)), each row sorted ascending by
    distance (equal distances by database index). FAISS returns the top
    min(max(candidates, k), len(database)) candidates in float32, which are re-ranked in
    float64; `candidates` only needs to exceed k by enough to absorb float32 rounding.
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if int(candidates) < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k, batch_size = int(k), int(batch_size)
    device = _resolve_device(device)
    queries = np.asarray(queries)
    database = np.asarray(database)
    q32 = _as_float32_matrix(queries, "queries")
    db32 = _as_float32_matrix(database, "database")
    if q32.shape[1] != db32.shape[1]:
        raise ValueError(
            f"queries have {q32.shape[1]} dims but database has {db32.shape[1]}"
        )
    m = db32.shape[0]
    if m < k:
        raise ValueError(f"database has {m} rows, fewer than k={k}")
    n = q32.shape[0]
    if n == 0:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float64)

    c = min(max(int(candidates), k), m)
    index, _resources = _build_index(db32, device)
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="knn", unit="batch", disable=len(starts) < 2):
        stop = min(start + batch_size, n)
        _, cand = index.search(q32[start:stop], c)
        if (cand < 0).any():
            raise RuntimeError("faiss returned fewer candidates than requested")
        indices[start:stop], distances[start:stop] = _rerank(
            queries[start:stop], database, cand.astype(np.int64, copy=False), k
        )
    return indices, distances


def search_samples(subset_path, manifest_path, out_path, space: str = "pixels", ratio: float | None = None,
                   device: str = "auto") -> dict:
    """Stage 5: nearest unique training images of every sample, with the L2 ratio decision, to Parquet."""
    import pyarrow.parquet as pq

    from .data import read_subset
    from .embed import embed
    from .io import atomic_output
    from .memorization import DEFAULT_RATIO, memorization_table, summarize
    from .shards import read_samples

    subset = read_subset(subset_path)
    images, table, manifest = read_samples(manifest_path)
    if images.shape[1:] != subset.images.shape[1:]:
        raise ValueError(f"samples {images.shape[1:]} and training images {subset.images.shape[1:]} differ in shape")
    indices, distances = nearest_neighbours(embed(images, space), embed(subset.images, space), k=2, device=device)
    result = memorization_table(indices, distances, subset.group, subset.labels,
                                table.column("sample_id").to_numpy(), ratio=ratio or DEFAULT_RATIO)
    with atomic_output(out_path) as tmp:
        pq.write_table(result.replace_schema_metadata({"space": space, "manifest": str(manifest_path)}), tmp)
    return summarize(result)
