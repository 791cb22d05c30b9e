"""The search benchmark core on a small run: both engines, real faiss, real PostgreSQL
with pgvector (an embedded pgserver in a temp folder, or DATABASE_URL). No timing
thresholds: these machines are shared and noisy."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import psycopg
import pytest

from embeddings.bench import (
    BenchReport,
    EngineResult,
    OperatingPoint,
    clustered_vectors,
    compare_at_recall,
    exact_ground_truth,
    format_table,
    latency_stats,
    recall_at_k,
    run_benchmark,
)

SCHEMA = "precedent_bench_test"


@pytest.fixture(scope="module")
def pg_uri(tmp_path_factory):
    """A PostgreSQL with pgvector: DATABASE_URL if set, else a private pgserver."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        server = pgserver.get_server(tmp_path_factory.mktemp("pgbench") / "pg", cleanup_mode="stop")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def test_clustered_vectors_are_deterministic_normalised_and_queries_are_fresh():
    xb, xq = clustered_vectors(2000, 48, n_queries=50, seed=4)
    xb2, xq2 = clustered_vectors(2000, 48, n_queries=50, seed=4)
    assert xb.dtype == np.float32 and xb.shape == (2000, 48) and xq.shape == (50, 48)
    np.testing.assert_array_equal(xb, xb2)
    np.testing.assert_array_equal(xq, xq2)
    np.testing.assert_allclose(np.linalg.norm(xb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(xq, axis=1), 1, atol=1e-5)
    best = (xq @ xb.T).max(axis=1)
    assert (best < 0.9999).all()  # no query is a copy of a database vector
    assert np.median(best) > 0.5  # but they come from the same distribution
    assert not np.array_equal(xb, clustered_vectors(2000, 48, n_queries=50, seed=5)[0])


def test_ground_truth_and_recall():
    xb, xq = clustered_vectors(3000, 32, n_queries=40, seed=1)
    scores, rows = exact_ground_truth(xb, xq, 10, batch=16)
    sims = xq @ xb.T
    np.testing.assert_array_equal(rows[:, 0], sims.argmax(axis=1))
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    assert recall_at_k(rows, rows, 10) == 1.0
    assert recall_at_k(np.full_like(rows, -1), rows, 10) == 0.0
    half = rows.copy()
    half[:, 5:] = -1
    assert recall_at_k(half, rows, 10) == 0.5


def test_latency_stats():
    stats = latency_stats([0.001] * 98 + [0.010, 0.020])
    assert stats.n == 100 and stats.p50_ms == pytest.approx(1.0)
    assert stats.p99_ms > 9 and stats.qps == pytest.approx(1000 / stats.mean_ms)
    with pytest.raises(ValueError):
        latency_stats([])


def test_small_run_of_both_engines(pg_uri):
    report = run_benchmark(
        5000,
        64,
        uri=pg_uri,
        n_queries=200,
        approx_threshold=1000,  # so the approximate index is the one measured
        faiss_sweep=(16, 64),
        pg_sweep=(20, 100),
        progress=False,
    )
    assert isinstance(report, BenchReport)
    f, p = report.faiss, report.pgvector
    assert f.extra["index_type"] == "hnsw" and f.n == 5000 and f.dim == 64
    assert p is not None and p.engine == "pgvector"
    for engine in (f, p):
        assert engine.build_s > 0 and engine.memory_bytes > 5000 * 64 * 4
        assert len(engine.points) == 2
        for point in engine.points:
            assert 0.0 <= point.recall <= 1.0
            assert 0 < point.p50_ms <= point.p99_ms
            assert point.qps_single > 0 and point.qps_throughput > 0
    assert max(pt.recall for pt in f.points) >= 0.9
    assert max(pt.recall for pt in p.points) >= 0.9  # the binary COPY loaded the right vectors
    assert report.comparison is not None and report.comparison.target_recall == 0.95

    # the scratch table (and its schema) are gone
    with psycopg.connect(pg_uri) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'precedent_bench' OR tablename LIKE 'bench\\_%%'"
        ).fetchone()[0]
        assert left == 0
        assert conn.execute("SELECT to_regnamespace('precedent_bench')").fetchone()[0] is None

    data = json.loads(report.to_json())
    assert data["faiss"]["points"][0]["setting"] == "efSearch=16"
    assert data["pgvector"]["points"][1]["setting"] == "hnsw.ef_search=100"
    table = format_table(report)
    assert "faiss" in table and "pgvector" in table and "recall@10" in table


def test_exact_index_is_one_point_without_pgvector():
    report = run_benchmark(800, 16, n_queries=30, progress=False)
    assert report.pgvector is None and report.comparison is None
    assert [p.setting for p in report.faiss.points] == ["exact"]
    assert report.faiss.points[0].recall == pytest.approx(1.0)
    assert "exact" in format_table(report)


def _engine(name: str, points: list[tuple[float, float]]) -> EngineResult:
    return EngineResult(
        engine=name,
        index="x",
        n=1,
        dim=1,
        build_s=1.0,
        memory_bytes=1,
        points=[
            OperatingPoint(f"s{i}", i, recall, p50, p50, p50, 1000 / p50, 2000 / p50)
            for i, (recall, p50) in enumerate(points)
        ],
    )


def test_compare_at_recall_picks_the_fastest_setting_reaching_the_target():
    faiss_ = _engine("faiss", [(0.90, 0.1), (0.96, 0.2), (0.99, 0.4)])
    pg = _engine("pgvector", [(0.94, 0.8), (0.97, 1.2), (0.995, 2.0)])
    cmp_ = compare_at_recall(faiss_, pg, 0.95)
    assert cmp_.faiss.setting == "s1" and cmp_.pgvector.setting == "s1"
    assert cmp_.qps_ratio_single == pytest.approx(6.0) and cmp_.p50_ratio == pytest.approx(6.0)
    none = compare_at_recall(faiss_, _engine("pgvector", [(0.5, 1.0)]), 0.95)
    assert none.pgvector is None and none.qps_ratio_single is None


def test_command_line_entry_point(tmp_path, capsys):
    from embeddings.bench import main

    out = tmp_path / "report.json"
    report = main(["--n", "600", "--dim", "8", "--queries", "20", "--no-pgvector", "--quiet", "--json", str(out)])
    assert report.faiss.points[0].setting == "exact"
    assert json.loads(out.read_text())["config"]["n"] == 600
    assert "recall@10" in capsys.readouterr().out
