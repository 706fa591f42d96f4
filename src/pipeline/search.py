"""Exact k-nearest-neighbour search between generated samples and training images.

FAISS (an exact flat L2 index, on GPU when the faiss build has one) finds a short list of
candidates per query in float32, at the cost of the float32 GEMM; the candidates are then
re-ranked by true Euclidean distance computed in float64 from the original vectors. The re-rank
matters because float32 squared distances can swap near-ties, and the memorization criterion
compares true distances.

The short list is kept short (k + 4 by default) and made safe by a certificate rather than by
length: a float32 squared distance computed as ||q||^2 + ||b||^2 - 2 q.b (FAISS's GEMM form) is
within E = gamma_{d+4} (||q|| + ||b||)^2 of the squared distance of the float32 vectors, with
gamma_n = n u / (1 - n u) and u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms,
Sec. 3.1: the bound for any summation order), and rounding the inputs to float32 moves a distance
by at most u (||q|| + ||b||). A query whose exact k-th distance lies below what any row outside
its short list could reach is certified; the few that are not are searched exhaustively in float64.
No library offers this combination (FAISS's exact search stops at float32, torch.cdist has no
certificate), hence the few lines here.
"""
from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

import faiss

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
_RERANK_CHUNK = 1 << 18  # gathered elements per re-rank step: small enough to stay in cache (3x faster than 2^24)
_U32 = 2.0 ** -24
# OpenBLAS core types whose SGEMM lacks AVX2/FMA kernels: a FAISS wheel that falls back to one of
# these on a modern CPU runs the search several times slower than the machine allows.
SLOW_BLAS_CORES = {"prescott", "core2", "penryn", "dunnington", "nehalem", "atom", "katmai", "coppermine",
                   "northwood", "banias", "opteron", "barcelona", "bobcat", "generic"}


def blas_report() -> list[dict]:
    """The BLAS libraries loaded in this process (threadpoolctl), with the core type OpenBLAS picked.

    Logged by every search; a slow core type is a warning, with the way to override it.
    """
    from threadpoolctl import threadpool_info

    info = [{k: entry.get(k) for k in ("internal_api", "architecture", "num_threads", "filepath")}
            for entry in threadpool_info() if entry.get("user_api") == "blas"]
    for entry in info:
        arch = (entry.get("architecture") or "").lower()
        if entry["internal_api"] == "openblas" and arch in SLOW_BLAS_CORES:
            log.warning("OpenBLAS in %s runs the %s kernel, slow on current CPUs: set OPENBLAS_CORETYPE "
                        "(e.g. Haswell or SkylakeX) to the machine's core type", entry["filepath"], entry["architecture"])
    return info


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


def _as_float32_matrix(x, name: str, check_finite: bool = True) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {x.shape}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has zero dimensions")
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if check_finite and not np.isfinite(x32).all():
        raise ValueError(f"{name} contains NaN/inf values (or values outside float32 range)")
    return x32


def _build_index(database32: np.ndarray, device: str, metric: str = "l2"):
    """Exact flat index (L2, or inner product for normalised descriptors); the GPU resources object
    is returned so it outlives the index."""
    index = faiss.IndexFlatL2(database32.shape[1]) if metric == "l2" else faiss.IndexFlatIP(database32.shape[1])
    resources = None
    if device == "cuda":
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(database32)
    return index, resources


def _integer_valued(x: np.ndarray) -> bool:
    """Integer data (uint8 pixels): differences and their squares are exact in float32 and float64."""
    return np.issubdtype(x.dtype, np.integer) and x.dtype.itemsize <= 2


def _rerank(queries, database, candidates: np.ndarray, k: int, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact float64 distances to each query's candidates; keep the k best, ties by index.

    Integer data take the differences in float32 (exact for |values| < 2^24) and accumulate the
    squares in float64 (exact below 2^53): the same numbers as a float64 computation at half the
    memory traffic. Works in row chunks so that the gathered (rows, candidates, dims) block stays small.
    """
    n, c = candidates.shape
    dim = database.shape[1]
    work = np.float32 if integer else np.float64
    out_idx = np.empty((n, k), dtype=np.int64)
    out_dist = np.empty((n, k), dtype=np.float64)
    step = max(1, _RERANK_CHUNK // (c * dim))
    for start in range(0, n, step):
        stop = min(start + step, n)
        cand = candidates[start:stop]
        q = np.asarray(queries[start:stop], dtype=work)
        y = np.asarray(database[cand.ravel()], dtype=work).reshape(stop - start, c, dim)
        diff = y - q[:, None, :]
        dist = np.sqrt(np.einsum("rcd,rcd->rc", diff, diff, dtype=np.float64))
        order = np.lexsort((cand, dist), axis=-1)[:, :k]
        out_idx[start:stop] = np.take_along_axis(cand, order, axis=1)
        out_dist[start:stop] = np.take_along_axis(dist, order, axis=1)
    return out_idx, out_dist


def _exhaustive(queries, database, k: int, integer: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest rows of a few queries over the whole database (the certificate's fallback).

    Squared distances ||q||^2 + ||b||^2 - 2 q.b by one float64 GEMM per database block, exact for
    integer data and within 1e-12 relative otherwise, pick a short list of k + 8, which the
    difference-form re-rank then orders exactly as a direct float64 computation would.
    """
    q = np.asarray(queries, dtype=np.float64)
    m, dim = database.shape
    short = min(m, k + 8)
    block = max(short, _RERANK_CHUNK * 4 // dim)
    q_sq = np.einsum("ij,ij->i", q, q)
    best = np.empty((len(q), 0), dtype=np.int64)
    best_sq = np.empty((len(q), 0))
    for start in range(0, m, block):
        y = np.asarray(database[start:start + block], dtype=np.float64)
        sq = q_sq[:, None] + np.einsum("ij,ij->i", y, y)[None, :] - 2.0 * (q @ y.T)
        idx = np.concatenate([best, np.broadcast_to(np.arange(start, start + len(y)), sq.shape)], axis=1)
        sq = np.concatenate([best_sq, sq], axis=1)
        keep = np.argsort(sq, axis=1, kind="stable")[:, :short]
        best, best_sq = np.take_along_axis(idx, keep, 1), np.take_along_axis(sq, keep, 1)
    return _rerank(queries, database, best, k, integer)


def _certified(dist_k: np.ndarray, fc_sq: np.ndarray, q_norm: np.ndarray, db_norm_max: float, dim: int,
               rounding: np.ndarray | float) -> np.ndarray:
    """True where no row outside the short list can be closer than the exact k-th distance.

    fc_sq: the largest float32 squared distance FAISS returned (every outsider computed at least
    that); q_norm, db_norm_max: norms of the float32 vectors FAISS saw; rounding: how far rounding
    the inputs to float32 can have moved a distance (0 when the conversion is exact).
    """
    n = dim + 4
    gamma = n * _U32 / (1 - n * _U32)
    err = gamma * (q_norm + db_norm_max) ** 2 * 1.01  # 1% slack for the float64 norms themselves
    reach = np.sqrt(np.maximum(fc_sq.astype(np.float64) - err, 0.0)) - rounding
    return dist_k < reach


def nearest_neighbours(
    queries,
    database,
    k: int = 2,
    candidates: int | None = None,
    device: str = "auto",
    batch_size: int = 16384,
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest database rows for every query row, by true Euclidean distance.

    Returns (indices int64 (n, k), distances float64 (n, k)), each row sorted ascending by
    distance (equal distances by database index). FAISS returns the top
    min(candidates, len(database)) rows in float32 (default k + 4), which are re-ranked in float64;
    queries the float32 short list cannot certify are searched exhaustively (see the module doc),
    so the result is exact for any `candidates` >= 1. Both sides are centred on the database mean
    first (rounded to an integer for integer data, so they stay exact): distances do not change,
    the float32 error bound shrinks with the norms. Memory: the database plus one batch of queries.

    `exclude` (int64 (n,), -1 for none) names a database row each query must not be matched with:
    a training image searched against its own training set (leave-one-out) finds its nearest *other*
    image. The search then runs for k + 1 and drops that row.
    """
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=np.int64)
        if exclude.shape != (np.asarray(queries).shape[0],):
            raise ValueError(f"exclude needs one database index per query, got shape {exclude.shape}")
        idx, dist = nearest_neighbours(queries, database, int(k) + 1, None if candidates is None else candidates + 1,
                                       device, batch_size)
        return _drop_excluded(idx, dist, exclude, int(k))
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    candidates = int(k) + 4 if candidates is None else candidates
    if int(candidates) < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    k, batch_size = int(k), int(batch_size)
    device = _resolve_device(device)
    queries = np.asarray(queries)
    database = np.asarray(database)
    for name, x in (("queries", queries), ("database", database)):
        if x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {x.shape}")
        if x.shape[1] == 0:
            raise ValueError(f"{name} has zero dimensions")
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims but database has {database.shape[1]}")
    m, dim = database.shape
    if m < k:
        raise ValueError(f"database has {m} rows, fewer than k={k}")
    integer = _integer_valued(queries) and _integer_valued(database)
    centre = database.mean(0, dtype=np.float64)
    if integer:
        centre = np.round(centre)
    work = np.float32 if integer else np.float64
    # np.subtract with an explicit dtype: 10x faster than `database - centre` on uint8 input
    db32 = _as_float32_matrix(np.subtract(database, centre.astype(work), dtype=work), "database",
                              check_finite=not integer)
    n = queries.shape[0]
    if n == 0:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float64)

    c = min(max(int(candidates), k), m)
    index, _resources = _build_index(db32, device)
    db_norm_max = float(np.sqrt(np.einsum("ij,ij->i", db32, db32, dtype=np.float64)).max())
    db_rounding = 0.0 if integer else _U32 * float(np.linalg.norm(database - centre, axis=1).max())
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float64)
    fallback = 0
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc="knn", unit="batch", disable=len(starts) < 2):
        stop = min(start + batch_size, n)
        q_centred = np.subtract(queries[start:stop], centre.astype(work), dtype=work)
        q32 = _as_float32_matrix(q_centred, "queries", check_finite=not integer)
        fd, cand = index.search(q32, c)
        if (cand < 0).any():
            raise RuntimeError("faiss returned fewer candidates than requested")
        idx, dist = _rerank(queries[start:stop], database, cand.astype(np.int64, copy=False), k, integer)
        if c < m:
            q_norm = np.sqrt(np.einsum("ij,ij->i", q32, q32, dtype=np.float64))
            rounding = 0.0 if integer else _U32 * np.linalg.norm(q_centred, axis=1) + db_rounding
            ok = _certified(dist[:, -1], fd[:, -1], q_norm, db_norm_max, dim, rounding)
            if not ok.all():
                rows = np.flatnonzero(~ok)
                idx[rows], dist[rows] = _exhaustive(queries[start:stop][rows], database, k, integer)
                fallback += len(rows)
        indices[start:stop], distances[start:stop] = idx, dist
    if n >= 1000 or fallback:
        log.info("knn: %d queries, %d database rows, %d candidates; %d searched exhaustively (%.2f%%)",
                 n, m, c, fallback, 100.0 * fallback / n)
    return indices, distances


def _drop_excluded(idx: np.ndarray, values: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k of k + 1 ranked neighbours per row, skipping the row's excluded index."""
    order = np.argsort(idx == exclude[:, None], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(values, order, 1)


def most_similar(queries: np.ndarray, database: np.ndarray, device: str = "auto",
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest database row by cosine similarity of L2-normalised descriptors (FAISS inner-product index),
    the similarity recomputed in float64 for the row found. Returns (index int64 (n,), similarity (n,)).
    `exclude` as in `nearest_neighbours` (leave-one-out)."""
    q32 = _as_float32_matrix(queries, "queries")
    db32 = _as_float32_matrix(database, "database")
    if q32.shape[1] != db32.shape[1]:
        raise ValueError(f"queries have {q32.shape[1]} dims but database has {db32.shape[1]}")
    if len(db32) == 0 or len(q32) == 0:
        raise ValueError("similarity search needs at least one query and one database row")
    index, _resources = _build_index(db32, _resolve_device(device), metric="ip")
    if exclude is None:
        _, idx = index.search(q32, 1)
    else:
        exclude = np.asarray(exclude, dtype=np.int64)
        if len(db32) < 2:
            raise ValueError("a leave-one-out search needs at least two database rows")
        scores, idx = index.search(q32, 2)
        idx, _ = _drop_excluded(idx, scores, exclude, 1)
    idx = idx[:, 0].astype(np.int64)
    sim = np.einsum("ij,ij->i", np.asarray(queries, np.float64), np.asarray(database, np.float64)[idx])
    return idx, sim


def prompt_similarities(samples: np.ndarray, train: np.ndarray, subset, table, device: str = "auto") -> dict:
    """For text-to-image samples (Table 3), against the memorized pairs of the training set only:
    `prompt_group` (memorized | held_out), `gt_similarity` (cosine similarity to the memorized image of
    the sample's own prompt, the most similar when several share it; NaN for a prompt the set did not
    memorize) and `memorized_similarity` (to the most similar memorized image, whatever its prompt)."""
    memorized = np.flatnonzero(subset.group == "memorized")
    if memorized.size == 0:
        raise ValueError("the training set has no memorized pairs to compare text-to-image samples with")
    _, nearest = most_similar(samples, train[memorized], device)
    prompts = [str(p) for p in table.column("prompt").to_pylist()]
    rows: dict[str, list[int]] = {}
    for r in memorized:
        rows.setdefault(str(subset.prompts[r]), []).append(int(r))
    gt = np.full(len(prompts), np.nan)
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    for p, members in by_prompt.items():
        if p in rows:
            sims = np.asarray(samples, np.float64)[members] @ np.asarray(train, np.float64)[rows[p]].T
            gt[members] = sims.max(axis=1)
    group = (table.column("prompt_group").to_pylist() if "prompt_group" in table.column_names
             else ["memorized" if p in rows else "held_out" for p in prompts])
    return {"prompt_group": [str(g) for g in group], "gt_similarity": gt, "memorized_similarity": nearest}


def own_training_index(table) -> np.ndarray | None:
    """The `own_train_index` column of a sample table: for rows that are themselves unique training images
    (the train-vs-train yardstick), the image's index, which its own search must skip; None without it."""
    from .shards import OWN_INDEX

    if OWN_INDEX not in table.column_names:
        return None
    return table.column(OWN_INDEX).to_numpy().astype(np.int64)


def sample_labels(table) -> np.ndarray | None:
    """The `label` column of a sample table (each sample's class, -1 when generated without one), or None."""
    return table.column("label").to_numpy().astype(np.int64) if "label" in table.column_names else None


def search_samples(subset_path, manifest_path, out_path, space: str = "pixels", ratio: float | None = None,
                   device: str = "auto") -> dict:
    """Stage 5: nearest unique training images of every sample, with the L2 ratio decision, to Parquet."""
    import pyarrow.parquet as pq

    from .data import read_subset
    from .embed import DISTANCE_SCALE, embed
    from .io import atomic_output
    from .memorization import DEFAULT_RATIO, memorization_table, summarize
    from .shards import read_samples

    subset = read_subset(subset_path)
    images, table, manifest = read_samples(manifest_path)
    if images.shape[1:] != subset.images.shape[1:]:
        raise ValueError(f"samples {images.shape[1:]} and training images {subset.images.shape[1:]} differ in shape")
    log.info("BLAS: %s", blas_report())
    exclude = own_training_index(table)
    indices, distances = nearest_neighbours(embed(images, space), embed(subset.images, space), k=2, device=device,
                                            exclude=exclude)
    distances = distances * DISTANCE_SCALE.get(space, 1.0)
    ratio = DEFAULT_RATIO if ratio is None else ratio
    result = memorization_table(indices, distances, subset.group, subset.labels,
                                table.column("sample_id").to_numpy(), ratio=ratio,
                                sample_labels=sample_labels(table))
    result = result.replace_schema_metadata({"space": space, "manifest": str(manifest_path), "ratio": repr(float(ratio))})
    with atomic_output(out_path) as tmp:
        pq.write_table(result, tmp)
    return summarize(result)


def similarity_table(samples_emb, train_emb, subset_path, manifest_path, out_path, device: str = "auto",
                     space: str = "sscd") -> None:
    """Stage 5 in a descriptor space (`space` names it in the file): each sample's most similar unique
    training image, to Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data import read_subset
    from .embed import read_embeddings
    from .io import atomic_output
    from .memorization import UNLABELLED, label_groups
    from .shards import read_samples

    samples, train = read_embeddings(samples_emb), read_embeddings(train_emb)
    subset = read_subset(subset_path)
    if len(train) != len(subset):
        raise ValueError(f"{train_emb} holds {len(train)} rows, {subset_path} {len(subset)} images: re-run embed")
    _, sample_table, manifest = read_samples(manifest_path)
    n = manifest["num_samples"]
    if len(samples) != n:
        raise ValueError(f"{samples_emb} holds {len(samples)} rows, {manifest_path} lists {n} samples")
    idx, sim = most_similar(samples, train, device, exclude=own_training_index(sample_table))
    labels = sample_labels(sample_table)
    labels = np.full(n, UNLABELLED, np.int64) if labels is None else labels
    table = pa.table({"sample_id": pa.array(np.arange(n, dtype=np.int64)), "nn1_index": pa.array(idx),
                      "similarity": pa.array(sim), "nn1_group": pa.array(subset.group[idx]),
                      "nn1_label": pa.array(subset.labels[idx]), "label": pa.array(labels),
                      "label_group": label_groups(labels, subset.group, subset.labels)})
    if subset.prompts is not None and "prompt" in sample_table.column_names:
        for name, values in prompt_similarities(samples, train, subset, sample_table, device).items():
            table = table.append_column(name, pa.array(values))
    with atomic_output(out_path) as tmp:
        pq.write_table(table.replace_schema_metadata({"space": space}), tmp)
