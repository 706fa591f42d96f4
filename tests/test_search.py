"""nearest_neighbours and the L2 ratio criterion against brute-force float64 numpy."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from pipeline.memorization import class_groups, l2_ratio_memorized, memorization_table, summarize
from pipeline.search import faiss_gpu_available, nearest_neighbours


def brute_force(queries, database, k=2):
    """Exact float64 distances by direct differences; ties broken by database index."""
    q = np.asarray(queries, dtype=np.float64)
    db = np.asarray(database, dtype=np.float64)
    dist = np.sqrt(((q[:, None, :] - db[None, :, :]) ** 2).sum(-1))
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), dist.shape), dist), axis=-1)[:, :k]
    return order, np.take_along_axis(dist, order, axis=1)


def planted(rng, n_train=500, dim=64, n_random=260, n_copies=20, n_halfway=20):
    """Random train/queries plus near-copies of known rows and midpoints of close row pairs.

    Each halfway pair is (row i, row i + a unit step), so its midpoint is 0.5 from both and far
    from every other row: its two nearest neighbours are exactly that pair, ratio 1.
    """
    train = rng.standard_normal((n_train, dim))
    rows = rng.choice(n_train, n_copies + 2 * n_halfway, replace=False)
    copy_src, first, second = np.split(rows, [n_copies, n_copies + n_halfway])
    step = rng.standard_normal((n_halfway, dim))
    train[second] = train[first] + step / np.linalg.norm(step, axis=1, keepdims=True)
    copies = train[copy_src] + 1e-3 * rng.standard_normal((n_copies, dim))
    halfway = 0.5 * (train[first] + train[second])
    queries = np.concatenate([copies, halfway, rng.standard_normal((n_random, dim))])
    return train, queries, copy_src, np.stack([first, second], axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("candidates,batch_size", [(16, 65536), (2, 64)])
def test_matches_brute_force_with_planted_samples(seed, candidates, batch_size):
    rng = np.random.default_rng(seed)
    train, queries, copy_src, pairs = planted(rng)
    n_halfway = len(pairs)
    n_copies = len(copy_src)
    idx, dist = nearest_neighbours(
        queries, train, k=2, candidates=candidates, device="cpu", batch_size=batch_size
    )
    ref_idx, ref_dist = brute_force(queries, train)
    assert idx.dtype == np.int64 and dist.dtype == np.float64
    assert idx.shape == dist.shape == (len(queries), 2)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12, atol=0)
    # Midpoints are exact ties (d1 == d2 up to rounding), whose order is arbitrary.
    tie = np.isclose(ref_dist[:, 0], ref_dist[:, 1], rtol=1e-12, atol=0)
    assert tie.sum() == n_halfway
    np.testing.assert_array_equal(idx[~tie], ref_idx[~tie])
    np.testing.assert_array_equal(np.sort(idx[tie], axis=1), np.sort(ref_idx[tie], axis=1))
    assert (np.diff(dist, axis=1) >= 0).all()

    mem = l2_ratio_memorized(dist[:, 0], dist[:, 1])
    np.testing.assert_array_equal(mem, ref_dist[:, 0] < ref_dist[:, 1] / 3)
    assert mem[:n_copies].all()
    np.testing.assert_array_equal(idx[:n_copies, 0], copy_src)
    halfway = slice(n_copies, n_copies + n_halfway)
    assert not mem[halfway].any()
    np.testing.assert_array_equal(np.sort(idx[halfway], axis=1), np.sort(pairs, axis=1))
    np.testing.assert_allclose(dist[halfway, 0] / dist[halfway, 1], 1.0, rtol=1e-9)
    assert not mem[n_copies + n_halfway :].any()


def test_larger_k_matches_brute_force():
    rng = np.random.default_rng(7)
    train = rng.standard_normal((200, 16))
    queries = rng.standard_normal((50, 16))
    idx, dist = nearest_neighbours(queries, train, k=5, candidates=3, device="cpu")
    ref_idx, ref_dist = brute_force(queries, train, k=5)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12)


def test_float64_rerank_fixes_float32_near_tie():
    # True distances 0.39999999 (row 0) < 0.40000001 (row 1); after float32 rounding of the
    # vectors, FAISS sees row 1 as closer.
    dim = 8
    train = np.zeros((3, dim))
    train[0, 0], train[1, 0], train[2, 0] = 0.1, 0.9, 5.0
    query = np.zeros((1, dim))
    query[0, 0] = 0.49999999

    flat = faiss.IndexFlatL2(dim)
    flat.add(train.astype(np.float32))
    _, faiss_idx = flat.search(query.astype(np.float32), 2)
    assert faiss_idx[0].tolist() == [1, 0], "construction no longer misleads float32 search"

    idx, dist = nearest_neighbours(query, train, k=2, device="cpu")
    ref_idx, ref_dist = brute_force(query, train)
    assert idx[0].tolist() == ref_idx[0].tolist() == [0, 1]
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-15)
    assert dist[0, 0] < dist[0, 1]


def test_uint8_inputs_do_not_wrap_around():
    train = np.array([[0, 0], [250, 250], [10, 10]], dtype=np.uint8)
    query = np.array([[255, 255]], dtype=np.uint8)
    idx, dist = nearest_neighbours(query, train, k=2, device="cpu")
    assert idx[0].tolist() == [1, 2]
    np.testing.assert_allclose(dist[0], [5 * np.sqrt(2), 245 * np.sqrt(2)])


def test_duplicates_must_be_removed_before_search():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((100, 32))
    train = np.concatenate([base, base[[7, 7, 7]]])
    exact_copy = base[[7]]
    noisy_copy = base[[7]] + 1e-4 * rng.standard_normal((1, 32))

    _, dist = nearest_neighbours(exact_copy, train, device="cpu")
    assert dist[0, 1] == 0.0
    with pytest.raises(ValueError, match="duplicate"):
        l2_ratio_memorized(dist[:, 0], dist[:, 1])
    _, dist = nearest_neighbours(noisy_copy, train, device="cpu")
    np.testing.assert_allclose(dist[0, 0], dist[0, 1])
    assert not l2_ratio_memorized(dist[:, 0], dist[:, 1])[0]

    unique = np.unique(train, axis=0)
    assert len(unique) == 100
    target = int(np.flatnonzero((unique == base[7]).all(axis=1))[0])
    for query in (exact_copy, noisy_copy):
        idx, dist = nearest_neighbours(query, unique, device="cpu")
        assert idx[0, 0] == target
        assert l2_ratio_memorized(dist[:, 0], dist[:, 1])[0]


def test_threshold_is_strict():
    assert not l2_ratio_memorized(np.array([1.0]), np.array([3.0]))[0]
    assert l2_ratio_memorized(np.array([np.nextafter(1.0, 0.0)]), np.array([3.0]))[0]
    assert l2_ratio_memorized(np.array([0.0]), np.array([3.0]))[0]

    train = np.zeros((3, 4))
    train[0, 0], train[1, 0], train[2, 0] = 1.0, 3.0, 10.0
    idx, dist = nearest_neighbours(np.zeros((1, 4)), train, device="cpu")
    assert dist[0].tolist() == [1.0, 3.0]
    table = memorization_table(idx, dist, ["a", "b", "c"], [0, 1, 2], ["s0"])
    assert table.column("memorized").to_pylist() == [False]
    assert table.column("ratio").to_pylist() == [1.0 / 3.0]


def test_memorization_table_and_summary_by_group():
    indices = np.array([[0, 1], [0, 2], [1, 0], [2, 3], [3, 2]])
    d1 = np.array([0.1, 0.2, 0.5, 0.9, 1.0])
    distances = np.stack([d1, np.ones(5)], axis=1)
    groups = np.array(["repeated", "repeated", "other", "other"])
    labels = np.array([0, 1, 5, 6])
    table = memorization_table(indices, distances, groups, labels, [10, 11, 12, 13, 14])

    assert table.column_names == [
        "sample_id", "nn1_index", "nn1_distance", "nn2_index", "nn2_distance",
        "ratio", "memorized", "nn1_group", "nn1_label", "label", "label_group",
    ]
    assert table.column("label").to_pylist() == [-1] * 5  # unconditional samples carry no class
    assert table.column("memorized").to_pylist() == [True, True, False, False, False]
    assert table.column("nn1_group").to_pylist() == [
        "repeated", "repeated", "repeated", "other", "other"
    ]
    assert table.column("nn1_label").to_pylist() == [0, 0, 1, 5, 6]
    assert table.column("nn2_index").to_pylist() == [1, 2, 0, 3, 2]

    summary = summarize(table)
    json.dumps(summary)
    assert summary["n_samples"] == 5
    assert summary["mem_ratio"] == pytest.approx(0.4)
    assert summary["ratio_mean"] == pytest.approx(0.54)
    assert summary["ratio_median"] == pytest.approx(0.5)
    assert summary["ratio_p05"] == pytest.approx(0.12)
    assert summary["nn1_distance_median"] == pytest.approx(0.5)
    assert summary["by_group"] == {
        "other": {"n_samples": 2, "mem_ratio": 0.0},
        "repeated": {"n_samples": 3, "mem_ratio": pytest.approx(2 / 3)},
    }
    assert type(summary["n_samples"]) is int and type(summary["ratio_p05"]) is float
    assert type(summary["by_group"]["other"]["n_samples"]) is int
    assert "by_label" not in summary and "by_class_group" not in summary


def test_class_labelled_samples_are_summarized_per_class_and_class_group():
    """Table 4 on ImageNet groups class-conditional samples by the class they were generated for: a
    sample of a repeated class counts there even when its nearest image lies in another group."""
    train_groups = np.array(["repeated", "repeated", "non_repeated", "non_repeated", "non_repeated"])
    train_labels = np.array([0, 0, 1, 2, 2])
    assert class_groups(train_groups, train_labels) == {0: "repeated", 1: "non_repeated", 2: "non_repeated"}
    indices = np.array([[0, 1], [2, 3], [3, 4], [1, 0], [4, 3]])
    d1 = np.array([0.1, 0.2, 0.9, 0.5, 0.05])
    sample_labels = np.array([0, 0, 2, 1, 7])  # class 7 has no training image
    table = memorization_table(indices, np.stack([d1, np.ones(5)], 1), train_groups, train_labels,
                               np.arange(5), sample_labels=sample_labels)
    assert table.column("label").to_pylist() == [0, 0, 2, 1, 7]
    assert table.column("label_group").to_pylist() == ["repeated", "repeated", "non_repeated", "non_repeated", "unseen"]
    summary = summarize(table)
    # memorized: samples 0, 1 and 4 (d1 < 1/3); by nearest image: repeated {0, 3}, non_repeated {1, 2, 4}
    assert summary["by_group"] == {"non_repeated": {"n_samples": 3, "mem_ratio": pytest.approx(2 / 3)},
                                   "repeated": {"n_samples": 2, "mem_ratio": 0.5}}
    assert summary["by_class_group"] == {"non_repeated": {"n_samples": 2, "mem_ratio": 0.0},
                                         "repeated": {"n_samples": 2, "mem_ratio": 1.0},
                                         "unseen": {"n_samples": 1, "mem_ratio": 1.0}}
    assert summary["by_label"] == {"0": {"n_samples": 2, "mem_ratio": 1.0}, "1": {"n_samples": 1, "mem_ratio": 0.0},
                                   "2": {"n_samples": 1, "mem_ratio": 0.0}, "7": {"n_samples": 1, "mem_ratio": 1.0}}
    # nearest images' classes 0, 1, 2, 0, 2 against the samples' 0, 0, 2, 1, 7
    assert summary["nn1_same_class"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="sample_labels"):
        memorization_table(indices, np.stack([d1, np.ones(5)], 1), train_groups, train_labels, np.arange(5),
                           sample_labels=[0, 1])


def test_memorization_table_rejects_duplicate_training_images():
    with pytest.raises(ValueError, match="duplicate"):
        memorization_table(np.array([[0, 1]]), np.array([[0.0, 0.0]]), ["g", "g"], [0, 0], [0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(queries=np.zeros(4), database=np.zeros((3, 4))), "2-D"),
        (dict(queries=np.zeros((2, 4)), database=np.zeros((3, 5))), "dims"),
        (dict(queries=np.zeros((2, 4)), database=np.zeros((1, 4))), "fewer than k"),
        (dict(queries=np.full((2, 4), np.nan), database=np.zeros((3, 4))), "NaN"),
        (dict(queries=np.zeros((2, 4)), database=np.full((3, 4), np.inf)), "NaN/inf"),
        (dict(queries=np.zeros((2, 4)), database=np.eye(4), k=0), "k must be"),
        (dict(queries=np.zeros((2, 4)), database=np.eye(4), device="tpu"), "device"),
    ],
)
def test_search_input_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nearest_neighbours(**kwargs)


def test_memorization_input_validation():
    with pytest.raises(ValueError, match="k>=2"):
        memorization_table(np.array([[0]]), np.array([[1.0]]), ["g"], [0], [0])
    with pytest.raises(ValueError, match="sample_ids"):
        memorization_table(np.array([[0, 1]]), np.array([[1.0, 2.0]]), ["g", "h"], [0, 1], [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        memorization_table(np.array([[5, 1]]), np.array([[1.0, 2.0]]), ["g", "h"], [0, 1], [0])
    with pytest.raises(ValueError, match="must not exceed"):
        l2_ratio_memorized(np.array([2.0]), np.array([1.0]))
    with pytest.raises(ValueError, match="empty"):
        summarize(memorization_table(np.empty((0, 2), int), np.empty((0, 2)), [], [], []))


def test_empty_queries():
    idx, dist = nearest_neighbours(np.zeros((0, 4)), np.eye(4), device="cpu")
    assert idx.shape == dist.shape == (0, 2)


@pytest.mark.skipif(faiss_gpu_available(), reason="faiss has GPU support here")
def test_cuda_without_faiss_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match="no GPU support"):
        nearest_neighbours(np.zeros((2, 4)), np.eye(4), device="cuda")
    idx, _ = nearest_neighbours(np.eye(4)[:2], np.eye(4), device="auto")
    assert idx[:, 0].tolist() == [0, 1]


# ------------------------------------------------------------------ exact search on uint8 pixels

def exact_integer(queries, database, k=2):
    """Brute force in int64: the exact squared distances of integer data; ties by database index."""
    q = queries.astype(np.int64)
    db = database.astype(np.int64)
    sq = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(len(db)), sq.shape), sq), axis=-1)[:, :k]
    return order, np.sqrt(np.take_along_axis(sq, order, axis=1).astype(np.float64))


def pixel_problem(rng, n_train=900, dim=3072, n_queries=120):
    """CIFAR-sized uint8 rows: near-copies, verbatim copies of a repeated image, and random queries."""
    train = rng.integers(0, 256, (n_train, dim), dtype=np.uint8)
    train[1] = train[0]  # a repeated image (exact tie: order by index)
    src = rng.choice(np.arange(2, n_train), 30, replace=False)
    queries = rng.integers(0, 256, (n_queries, dim), dtype=np.uint8)
    queries[:30] = np.clip(train[src].astype(np.int16) + rng.integers(-2, 3, (30, dim)), 0, 255)
    queries[30:35] = train[0]
    return train, queries, src


@pytest.mark.parametrize("candidates,batch_size", [(None, 16384), (2, 7), (1, 50)])
def test_uint8_search_is_exact(candidates, batch_size):
    """Identical indices and distances to an int64 brute force, whether the float32 short list
    certifies a query or the exhaustive fallback (database scanned in several blocks) decides it."""
    rng = np.random.default_rng(11)
    train, queries, src = pixel_problem(rng)
    idx, dist = nearest_neighbours(queries, train, k=2, candidates=candidates, device="cpu", batch_size=batch_size)
    ref_idx, ref_dist = exact_integer(queries, train)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(idx[:30, 0], src)
    assert (idx[30:35] == [0, 1]).all() and (dist[30:35] == 0).all()


@pytest.mark.parametrize("candidates", [None, 1])
def test_leave_one_out_finds_the_nearest_other_row(candidates):
    """Training rows searched against their own set skip themselves, and only themselves: a verbatim
    repeat of an image is still found at distance 0 (the information a train-vs-train row exists for)."""
    rng = np.random.default_rng(5)
    train, _, _ = pixel_problem(rng, n_train=300, dim=256)
    rows = np.concatenate([np.arange(300), [0, 1, 7]])
    idx, dist = nearest_neighbours(train[rows], train, k=2, candidates=candidates, device="cpu", exclude=rows)
    ref_idx, ref_dist = exact_integer(train[rows], train, k=3)
    keep = ref_idx != rows[:, None]
    ref_idx = np.stack([r[m][:2] for r, m in zip(ref_idx, keep)])
    ref_dist = np.stack([r[m][:2] for r, m in zip(ref_dist, keep)])
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert (idx != rows[:, None]).all()
    assert idx[0, 0] == 1 and idx[1, 0] == 0 and dist[0, 0] == 0 and dist[1, 0] == 0  # rows 0 and 1 are one image
    with pytest.raises(ValueError, match="one database index per query"):
        nearest_neighbours(train[:3], train, k=2, exclude=np.arange(2))


def test_most_similar_leave_one_out():
    from pipeline.search import most_similar

    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16))
    x[10] = x[3] + 0.01 * rng.standard_normal(16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx, sim = most_similar(x, x, device="cpu", exclude=np.arange(50))
    gram = x @ x.T
    np.fill_diagonal(gram, -np.inf)
    np.testing.assert_array_equal(idx, gram.argmax(1))
    np.testing.assert_allclose(sim, gram.max(1), rtol=1e-12)
    assert idx[3] == 10 and idx[10] == 3
    same, sim_self = most_similar(x, x, device="cpu")
    assert (same == np.arange(50)).all() and np.allclose(sim_self, 1.0)


def test_fallback_is_taken_and_exact(caplog):
    """With a one-row short list on random data most queries cannot be certified; they are then
    searched exhaustively, and the log says how many."""
    import logging

    rng = np.random.default_rng(12)
    train = rng.integers(0, 256, (700, 3072), dtype=np.uint8)
    queries = rng.integers(0, 256, (40, 3072), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="pipeline.search"):
        idx, dist = nearest_neighbours(queries, train, k=2, candidates=1, device="cpu")
    ref_idx, ref_dist = exact_integer(queries, train)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist, ref_dist)
    assert "searched exhaustively" in caplog.text


def test_float32_error_bound_holds():
    """The certificate's bound on FAISS's float32 squared distances is never exceeded (it is a
    worst-case bound: the measured error is orders of magnitude below it)."""
    from pipeline.search import _U32

    rng = np.random.default_rng(13)
    train = rng.integers(0, 256, (300, 3072), dtype=np.uint8)
    queries = rng.integers(0, 256, (60, 3072), dtype=np.uint8)
    flat = faiss.IndexFlatL2(3072)
    flat.add(train.astype(np.float32))
    fd, cand = flat.search(queries.astype(np.float32), 300)
    exact = ((queries[:, None, :].astype(np.int64) - train[cand].astype(np.int64)) ** 2).sum(-1)
    n = 3072 + 4
    bound = n * _U32 / (1 - n * _U32) * (np.linalg.norm(queries.astype(np.float64), axis=1)[:, None]
                                          + np.linalg.norm(train.astype(np.float64), axis=1).max()) ** 2
    err = np.abs(fd.astype(np.float64) - exact)
    assert (err <= bound).all()
    assert err.max() < 1e-2 * bound.min()


def test_float_inputs_near_tie_certificate_accounts_for_rounding():
    """float64 inputs that float32 cannot hold: the rounding term keeps the certificate honest, so
    a pair float32 would swap still comes out in true order with a short list of one."""
    dim = 8
    train = np.zeros((50, dim))
    train[:, 1] = np.arange(50) + 10.0
    train[0, 0], train[1, 0] = 0.1, 0.9
    train[0, 1] = train[1, 1] = 0.0
    query = np.zeros((1, dim))
    query[0, 0] = 0.49999999
    idx, dist = nearest_neighbours(query, train, k=2, candidates=1, device="cpu")
    ref_idx, ref_dist = brute_force(query, train)
    assert idx[0].tolist() == ref_idx[0].tolist() == [0, 1]
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-15)


def test_blas_report_names_the_kernels():
    from pipeline.search import blas_report

    report = blas_report()
    assert report and all({"internal_api", "architecture", "num_threads"} <= set(e) for e in report)


def test_slow_openblas_kernel_is_a_warning(monkeypatch, caplog):
    import logging

    import threadpoolctl

    fake = [{"user_api": "blas", "internal_api": "openblas", "architecture": "Prescott", "num_threads": 2,
             "filepath": "/x/libopenblas.so"}]
    monkeypatch.setattr(threadpoolctl, "threadpool_info", lambda: fake)
    from pipeline.search import blas_report

    with caplog.at_level(logging.WARNING, logger="pipeline.search"):
        assert blas_report()[0]["architecture"] == "Prescott"
    assert "OPENBLAS_CORETYPE" in caplog.text


def test_calibrated_threshold_lets_through_at_most_the_stated_share_of_held_out_images():
    """`memorization.sscd.calibrate`: the threshold is an observed held-out similarity, and at most
    1 - quantile of the held-out images lie above it, whatever their number."""
    from pipeline.memorization import calibrated_threshold, similarity_summary

    rng = np.random.default_rng(0)
    for n in (24, 100, 512, 1001):
        heldout = rng.uniform(0.8, 1.0, size=n)
        for q in (0.9, 0.99):
            t = calibrated_threshold(heldout, q)
            assert t in heldout
            share = similarity_summary(heldout, threshold=t)["mem_ratio"]
            assert share <= 1 - q + 1e-12 and share > 1 - q - 1 / n - 1e-12
    assert calibrated_threshold(np.arange(24.0), 0.99) == 23.0  # fewer than 100 images: their maximum
    with pytest.raises(ValueError, match="strictly between"):
        calibrated_threshold(np.ones(3), 1.0)
