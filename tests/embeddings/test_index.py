"""VectorIndex against real faiss: recall vs exact search, filters, removal, persistence,
concurrency. No Django, no database."""

from __future__ import annotations

import json
import threading

import faiss  # noqa: I001
import numpy as np
import pytest
from faiss.contrib.evaluation import knn_intersection_measure
from faiss.contrib.exhaustive_search import knn_ground_truth

import embeddings.index as index_module
from embeddings.bench import clustered_vectors
from embeddings.index import (
    HNSWParams,
    IndexFileError,
    IVFParams,
    VectorIndex,
    ids_checksum,
)

DIM = 128
N = 20_000
K = 10


@pytest.fixture(scope="module")
def data():
    xb, xq = clustered_vectors(N, DIM, n_queries=200, seed=3)
    ids = np.arange(N, dtype=np.int64) * 7 + 11  # ids unrelated to positions
    return ids, xb, xq


def exact_top(xb_ids, xb, xq, k, allowed=None):
    """Brute-force top-k (ids) with numpy, optionally among `allowed` ids only."""
    if allowed is not None:
        keep = np.isin(xb_ids, allowed)
        xb_ids, xb = xb_ids[keep], xb[keep]
    sims = xq @ xb.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return xb_ids[order], np.take_along_axis(sims, order, axis=1)


def gt_ids(ids, xb, xq, k=K):
    """Exact ground truth through faiss.contrib (blocks of the database)."""

    def blocks():
        for start in range(0, len(xb), 5000):
            yield xb[start : start + 5000]

    _, rows = knn_ground_truth(xq, blocks(), k, metric_type=faiss.METRIC_INNER_PRODUCT)
    return ids[rows]


@pytest.fixture(scope="module")
def built(data):
    """One index of each approximate type over the module data (built once)."""
    ids, xb, _ = data
    out = {}
    for kind in ("hnsw", "ivf"):
        index = VectorIndex(DIM, approx_threshold=1000, approximate=kind)
        index.rebuild(ids, xb)
        out[kind] = index
    flat = VectorIndex(DIM, approx_threshold=10 * N)
    flat.rebuild(ids, xb)
    out["flat"] = flat
    return out


# ---------------------------------------------------------------- type choice, recall


def test_automatic_choice_follows_the_threshold(data):
    ids, xb, _ = data
    index = VectorIndex(DIM, approx_threshold=3000)
    index.add(ids[:3000], xb[:3000])
    assert index.index_type == "flat" and len(index) == 3000
    index.add(ids[3000:3500], xb[3000:3500])  # crossing the threshold converts
    assert index.index_type == "hnsw" and len(index) == 3500
    assert set(index.ids()) == set(ids[:3500])


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_recall_at_10_of_the_automatic_approximate_index(data, built, kind):
    ids, xb, xq = data
    index = built[kind]
    assert index.index_type == kind
    _, found = index.search(xq, K)
    recall = knn_intersection_measure(found, gt_ids(ids, xb, xq))
    assert recall >= 0.95, f"{kind} recall@10 {recall:.3f}"


def test_exact_index_equals_brute_force(data, built):
    ids, xb, xq = data
    scores, found = built["flat"].search(xq[:20], K)
    want_ids, want_scores = exact_top(ids, xb, xq[:20], K)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- filtered search


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
@pytest.mark.parametrize("n_allowed", [3, 40, 900])
def test_filtered_search_is_exact_top_k_among_allowed(data, built, kind, n_allowed):
    ids, xb, xq = data
    rng = np.random.default_rng(n_allowed)
    allowed = rng.choice(ids, n_allowed, replace=False)
    scores, found = built[kind].search(xq[:30], K, allowed_ids=allowed)
    want, want_scores = exact_top(ids, xb, xq[:30], K, allowed)
    kk = min(K, n_allowed)
    np.testing.assert_array_equal(found[:, :kk], want[:, :kk])
    np.testing.assert_allclose(scores[:, :kk], want_scores[:, :kk], rtol=1e-5, atol=1e-5)
    assert (found[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_broad_filter_uses_the_approximate_index_and_never_returns_fewer_than_k(data, built, kind):
    ids, xb, xq = data
    allowed = ids[::2]  # 10,000 allowed > exact_subset_max: selector on the graph/lists
    _, found = built[kind].search(xq, K, allowed_ids=allowed)
    assert (found >= 0).all()
    assert np.isin(found, allowed).all()
    recall = knn_intersection_measure(found, exact_top(ids, xb, xq, K, allowed)[0])
    assert recall >= 0.9
    banned = np.concatenate([found[:, :3].ravel(), ids[1::2][:100]])  # some outside the allowed set
    _, found2 = built[kind].search(xq, K, allowed_ids=allowed, exclude_ids=banned)
    assert (found2 >= 0).all() and np.isin(found2, allowed).all() and not np.isin(found2, banned).any()


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_very_selective_filter_through_the_approximate_path_still_returns_k(data, built, kind, monkeypatch):
    """Force the selector path for a 0.5% filter: traversal finds too few members, the
    search is retried wider and then exactly; it must still return exactly the top k."""
    ids, xb, xq = data
    index = built[kind]
    monkeypatch.setattr(index_module, "_GATHER_MAX", 0)
    monkeypatch.setattr(index, "exact_subset_max", 0)
    allowed = np.random.default_rng(7).choice(ids, 100, replace=False)
    _, found = index.search(xq[:20], K, allowed_ids=allowed)
    assert (found >= 0).all() and np.isin(found, allowed).all()
    assert knn_intersection_measure(found, exact_top(ids, xb, xq[:20], K, allowed)[0]) >= 0.8  # approximate here


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_exclude_ids_are_never_returned(data, built, kind):
    ids, xb, xq = data
    _, first = built[kind].search(xq[:50], K)
    exclude = np.unique(first)
    _, found = built[kind].search(xq[:50], K, exclude_ids=exclude)
    assert (found >= 0).all() and not np.isin(found, exclude).any()
    # exclude combined with allow
    allowed = ids[:500]
    _, found = built[kind].search(xq[:5], K, allowed_ids=allowed, exclude_ids=allowed[:490])
    assert set(found.ravel()) == set(allowed[490:])


# ---------------------------------------------------------------- removal


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_removed_ids_never_come_back(kind):
    xb, xq = clustered_vectors(4000, 32, n_queries=100, seed=5)
    ids = np.arange(4000, dtype=np.int64) + 100
    index = VectorIndex(32, index_type=kind, tombstone_rebuild_fraction=0.5)
    index.add(ids, xb)
    _, before = index.search(xq, K)
    gone = np.unique(before[:, :3])  # ids that certainly would be returned
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0  # already gone
    assert len(index) == 4000 - len(gone)
    if kind != "flat":
        assert index.tombstones == len(gone)
    _, after = index.search(xq, K)
    assert not np.isin(after, gone).any() and (after >= 0).all()
    _, filtered = index.search(xq, K, allowed_ids=np.concatenate([gone, ids[:50]]))
    assert not np.isin(filtered, gone).any()
    _, excluded = index.search(xq, K, exclude_ids=after[:, :2].ravel())  # tombstones and exclusions together
    assert not np.isin(excluded, gone).any() and not np.isin(excluded, after[:, :2]).any()
    assert (excluded >= 0).all()
    assert gone[0] not in index and ids[-1] in index
    # re-adding a removed id works: it is found for its own vector
    index.add(gone[:1], xb[gone[0] - 100])
    _, again = index.search(xb[gone[0] - 100], 1)
    assert again[0, 0] == gone[0]


def test_tombstones_trigger_compaction_and_stay_gone():
    xb, xq = clustered_vectors(3000, 32, n_queries=50, seed=6)
    ids = np.arange(3000, dtype=np.int64)
    index = VectorIndex(32, index_type="hnsw", tombstone_rebuild_fraction=0.1)
    index.add(ids, xb)
    index.remove(ids[:200])
    assert index.tombstones == 200
    index.remove(ids[200:400])  # 400 / 3000 > 10%: compacted
    assert index.tombstones == 0 and len(index) == 2600 and index.index_type == "hnsw"
    _, found = index.search(xq, K)
    assert not np.isin(found, ids[:400]).any()


def test_upsert_replaces_the_vector(data):
    ids, xb, _ = data
    for kind in ("flat", "hnsw"):
        index = VectorIndex(DIM, index_type=kind)
        index.add(ids[:500], xb[:500])
        index.add(ids[:1], xb[499])  # same id, new vector
        assert len(index) == 500
        got_ids, vecs = index.get_vectors(ids[:1])
        np.testing.assert_allclose(vecs[0], xb[499], atol=1e-6)
        _, found = index.search(xb[499], 2)
        assert set(found[0]) == {ids[0], ids[499]}


# ---------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path, data, kind):
    ids, xb, xq = data
    n = 5000
    index = VectorIndex(DIM, index_type=kind, kind="region", encoder_version="resnet18-v3")
    index.add(ids[:n], xb[:n])
    index.remove(ids[:10])
    manifest = index.save(tmp_path / "idx")
    assert manifest.count == n - 10 and manifest.dim == DIM and manifest.index_type == kind
    assert manifest.ids_sha256 == ids_checksum(ids[10:n]) == index.checksum()
    assert manifest.encoder_version == "resnet18-v3" and manifest.kind == "region"
    on_disk = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert on_disk["ids_sha256"] == manifest.ids_sha256 and on_disk["format_version"] == 1

    loaded, manifest2 = VectorIndex.load(tmp_path / "idx")
    assert manifest2 == manifest
    assert loaded.index_type == kind and len(loaded) == n - 10 and loaded.kind == "region"
    s1, i1 = index.search(xq, K, allowed_ids=ids[:3000])
    s2, i2 = loaded.search(xq, K, allowed_ids=ids[:3000])
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    s1, i1 = index.search(xq, K)
    s2, i2 = loaded.search(xq, K)
    np.testing.assert_array_equal(i1, i2)
    assert not np.isin(i2, ids[:10]).any()
    loaded.add(ids[n : n + 10], xb[n : n + 10])  # a loaded index keeps working
    assert len(loaded) == n
    assert not list((tmp_path / "idx").glob("*.tmp"))  # no temp files left behind


def test_missing_and_corrupt_files_raise_clear_errors(tmp_path, data):
    ids, xb, _ = data
    with pytest.raises(IndexFileError, match="no index manifest"):
        VectorIndex.load(tmp_path / "nowhere")

    directory = tmp_path / "idx"
    VectorIndex(DIM, index_type="hnsw").save(directory)  # an empty index saves and loads
    index = VectorIndex(DIM)
    index.add(ids[:300], xb[:300])
    index.save(directory)
    assert len(VectorIndex.load(directory)[0]) == 300

    index_file = directory / "index.faiss"
    good = index_file.read_bytes()
    index_file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(IndexFileError, match="does not match its manifest"):
        VectorIndex.load(directory)
    with pytest.raises(IndexFileError, match="cannot read index file"):
        VectorIndex.load(directory, verify=False)
    index_file.unlink()
    with pytest.raises(IndexFileError, match="index file missing"):
        VectorIndex.load(directory)
    index_file.write_bytes(good)
    VectorIndex.load(directory)

    manifest = directory / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[:40])
    with pytest.raises(IndexFileError, match="corrupt index manifest"):
        VectorIndex.load(directory)
    data_ = json.loads(text)
    data_["ids_sha256"] = ids_checksum([1, 2, 3])
    manifest.write_text(json.dumps(data_))
    with pytest.raises(IndexFileError, match="ids"):
        VectorIndex.load(directory)
    data_["format_version"] = 99
    manifest.write_text(json.dumps(data_))
    with pytest.raises(IndexFileError, match="format version"):
        VectorIndex.load(directory)


def test_ids_checksum_ignores_order():
    assert ids_checksum([3, 1, 2]) == ids_checksum(np.array([1, 2, 3])) != ids_checksum([1, 2])


# ---------------------------------------------------------------- concurrency


def test_concurrent_searches_during_add_conversion_and_rebuild():
    xb, xq = clustered_vectors(6000, 32, n_queries=64, seed=8)
    ids = np.arange(6000, dtype=np.int64) + 1
    index = VectorIndex(32, approx_threshold=3000, add_chunk=200)
    index.add(ids[:1000], xb[:1000])
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = [0]

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = xq[rng.integers(len(xq))]
                allowed = ids[: rng.integers(100, 6000)] if rng.random() < 0.3 else None
                _, found = index.search(q, K, allowed_ids=allowed)
                valid = found[found >= 0]
                assert len(valid) == K  # always at least K ids live (1000 from the start)
                assert np.isin(valid, ids).all()
                assert len(set(valid)) == len(valid)
                counts[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    try:
        for start in range(1000, 6000, 500):  # crosses 3000: flat -> HNSW while serving
            index.add(ids[start : start + 500], xb[start : start + 500])
        assert index.index_type == "hnsw"
        index.rebuild(ids[:4000], xb[:4000])
        index.remove(ids[:100])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    assert counts[0] > 0
    assert len(index) == 3900


def test_writes_during_a_rebuild_are_kept():
    xb, _ = clustered_vectors(3000, 32, n_queries=1, seed=9)
    ids = np.arange(3000, dtype=np.int64)
    index = VectorIndex(32, index_type="hnsw")
    index.add(ids[:2000], xb[:2000])
    fired = []

    def during_build(done: int, total: int) -> None:
        if not fired:  # runs in the rebuilding thread, while the new index is built aside
            fired.append(True)
            index.add(ids[2500:2600], xb[2500:2600])
            index.remove(ids[:5])
            assert len(index) == 2095  # the serving index already has the writes

    index.rebuild(ids[:2500], xb[:2500], progress=during_build)
    assert fired
    assert len(index) == 2595
    assert set(index.ids()) == set(ids[5:2600])


# ---------------------------------------------------------------- validation


def test_k_validation_and_padding(data):
    ids, xb, xq = data
    index = VectorIndex(DIM)
    scores, found = index.search(xq[0], 5)  # empty index: padded, no error
    assert (found == -1).all() and found.shape == (1, 5)
    index.add(ids[:4], xb[:4])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            index.search(xq[0], bad)
    scores, found = index.search(xq[:2], 6)
    assert found.shape == (2, 6) and scores.dtype == np.float32 and found.dtype == np.int64
    assert set(found[0, :4]) == set(ids[:4]) and (found[:, 4:] == -1).all()
    assert np.isneginf(scores[:, 4:]).all() and (np.diff(scores[0, :4]) <= 0).all()


def test_input_validation(data):
    ids, xb, _ = data
    index = VectorIndex(DIM)
    with pytest.raises(ValueError, match="shape"):
        index.add(ids[:3], xb[:3, :10])
    with pytest.raises(ValueError, match="ids for"):
        index.add(ids[:3], xb[:4])
    bad = xb[:2].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        index.add(ids[:2], bad)
    with pytest.raises(ValueError, match=">= 0"):
        index.add([-1], xb[:1])
    with pytest.raises(ValueError, match="shape"):
        index.search(np.ones(DIM + 1, np.float32), 3)
    # vectors are normalised on the way in: a scaled copy scores ~1 against itself
    index.add(ids[:1], xb[:1] * 5)
    scores, _ = index.search(xb[0] * 0.1, 1)
    assert abs(scores[0, 0] - 1.0) < 1e-5


def test_thread_settings(monkeypatch):
    assert VectorIndex(8).search_threads == 1  # measured: 1 thread beats 2 for one query
    monkeypatch.setenv("PRECEDENT_FAISS_SEARCH_THREADS", "2")
    monkeypatch.setenv("PRECEDENT_FAISS_BATCH_THREADS", "1")
    index = VectorIndex(8)
    assert (index.search_threads, index.batch_threads) == (2, 1)
    assert VectorIndex(8, search_threads=1, batch_threads=2).batch_threads == 2


def test_search_params_and_gpu_off_here():
    index = VectorIndex(8, hnsw=HNSWParams(ef_search=32), ivf=IVFParams(nprobe=4))
    index.set_search_params(ef_search=128, nprobe=16)
    assert index.hnsw_params.ef_search == 128 and index.ivf_params.nprobe == 16
    with pytest.raises(ValueError):
        index.set_search_params(ef_search=0)
    assert index.use_gpu is (faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"))


def test_ivf_starts_exact_and_retrains_as_the_collection_grows():
    xb, xq = clustered_vectors(6000, 16, n_queries=20, seed=10)
    ids = np.arange(6000, dtype=np.int64)
    index = VectorIndex(16, index_type="ivf")
    index.add(ids[:500], xb[:500])
    assert index.index_type == "flat"  # too few vectors to train IVF
    index.add(ids[500:1100], xb[500:1100])
    assert index.index_type == "ivf"
    small_nlist = index.params()["nlist"]
    index.add(ids[1100:], xb[1100:])  # > 4x the training size: retrained
    assert index.index_type == "ivf" and len(index) == 6000
    assert index.params()["nlist"] > small_nlist
    _, found = index.search(xq, K)
    assert knn_intersection_measure(found, exact_top(ids, xb, xq, K)[0]) >= 0.9
