"""Search benchmark core: our FAISS index (VectorIndex) and pgvector HNSW, same vectors.

Pure module (no Django): `python manage.py bench_search` wraps `run_benchmark` and adds
the "through the service" and "API end to end" rows with `latency_stats`.

What is measured, and why this way:

* Data: clustered synthetic vectors with a low intrinsic dimension (Gaussian clusters in
  a `latent_dim` space, randomly projected to `dim`, plus a little isotropic noise, then
  L2-normalised), which is how CNN embeddings behave; uneven cluster sizes. Queries are
  fresh draws from the same mixture, never copies of database vectors.
* Ground truth: exact inner-product top-k with faiss brute force, in query batches large
  enough to stay on the BLAS path.
* recall@k: |returned top-k ∩ exact top-k| / k, averaged (faiss.contrib.evaluation).
* Single-query latency: one query at a time through `VectorIndex.search` (1 OpenMP
  thread, as served), or one `SELECT ... ORDER BY embedding <#> $1 LIMIT k` round trip
  over the PostgreSQL Unix socket with a prepared statement and a binary parameter (as a
  Django view would query pgvector). p50/p99/mean over `n_single` queries, after warm-up.
* Throughput: faiss answers the whole query set as one batch (all cores); pgvector gets
  `concurrency` connections (default: the number of cores) issuing single queries.
* pgvector build: UNLOGGED table, binary COPY, `parallel_workers` set on the table
  (otherwise the build skips parallel workers for TOASTed 512-d vectors),
  `maintenance_work_mem` sized so the graph fits (else the build slows down sharply).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform as _stdlib_platform
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from embeddings.index import HNSWParams, IVFParams, VectorIndex
from embeddings.synthetic import clustered_vectors  # noqa: F401  (re-exported: the benchmark's data)

try:  # tqdm is optional: progress bars only
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


# --------------------------------------------------------------------------- data


def exact_ground_truth(
    database: np.ndarray, queries: np.ndarray, k: int = 10, *, batch: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores, row indices), faiss brute force per batch."""
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    scores = np.empty((len(queries), k), np.float32)
    rows = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        d, i = faiss.knn(queries[start : start + batch], database, k, metric=faiss.METRIC_INNER_PRODUCT)
        scores[start : start + batch], rows[start : start + batch] = d, i
    return scores, rows


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k (padding -1 never matches)."""
    from faiss.contrib.evaluation import knn_intersection_measure

    found = np.asarray(found)[:, :k]
    truth = np.asarray(truth)[:, :k]
    found = np.where(found < 0, -2, found)  # -1 padding must not match anything
    return float(knn_intersection_measure(found, truth))


# --------------------------------------------------------------------------- results


@dataclass
class LatencyStats:
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def qps(self) -> float:
        """Queries per second of one client issuing queries back to back."""
        return 1000.0 / self.mean_ms if self.mean_ms > 0 else float("inf")


def latency_stats(seconds: Sequence[float]) -> LatencyStats:
    """p50/p99/mean in milliseconds from per-query wall times in seconds."""
    arr = np.asarray(seconds, dtype=np.float64) * 1000.0
    if not len(arr):
        raise ValueError("no samples")
    return LatencyStats(
        n=len(arr),
        p50_ms=float(np.percentile(arr, 50)),
        p99_ms=float(np.percentile(arr, 99)),
        mean_ms=float(arr.mean()),
    )


def time_single_queries(
    search: Callable[[np.ndarray], Any], queries: np.ndarray, *, warmup: int = 20
) -> tuple[LatencyStats, list[Any]]:
    """Call `search(query_row)` once per query, timing each call; returns the stats and
    what each call returned (for recall). The lead's service/API rows reuse this."""
    for q in queries[: min(warmup, len(queries))]:
        search(q)
    samples, outputs = [], []
    for q in queries:
        t0 = time.perf_counter()
        outputs.append(search(q))
        samples.append(time.perf_counter() - t0)
    return latency_stats(samples), outputs


@dataclass
class OperatingPoint:
    """One setting of an engine's recall/speed knob."""

    setting: str  # e.g. "efSearch=64", "hnsw.ef_search=40", "exact"
    value: int | None
    recall: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    qps_single: float  # one client, back to back
    qps_throughput: float  # faiss: one batch on all cores; pgvector: `concurrency` clients


@dataclass
class EngineResult:
    engine: str  # "faiss" or "pgvector"
    index: str  # human description, e.g. "HNSW32 efConstruction=80"
    n: int
    dim: int
    build_s: float
    memory_bytes: int  # index structures (faiss) / index relation size (pgvector)
    points: list[OperatingPoint] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def best_at(self, target_recall: float) -> OperatingPoint | None:
        """Lowest-p50 point reaching `target_recall`, or None."""
        ok = [p for p in self.points if p.recall >= target_recall]
        return min(ok, key=lambda p: p.p50_ms) if ok else None


@dataclass
class Comparison:
    target_recall: float
    faiss: OperatingPoint | None
    pgvector: OperatingPoint | None
    qps_ratio_single: float | None  # faiss single-client QPS / pgvector's
    qps_ratio_throughput: float | None
    p50_ratio: float | None  # pgvector p50 / faiss p50


@dataclass
class BenchReport:
    config: dict[str, Any]
    machine: dict[str, Any]
    data_s: float
    ground_truth_s: float
    faiss: EngineResult
    pgvector: EngineResult | None = None
    comparison: Comparison | None = None
    extra_rows: list[dict[str, Any]] = field(default_factory=list)  # service / API rows added by the command

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **{"indent": 2, **kwargs})


# --------------------------------------------------------------------------- helpers


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return 0


def _bar(total: int, desc: str, enabled: bool):
    if enabled and tqdm is not None:
        return tqdm(total=total, desc=desc, unit="vec", unit_scale=True, leave=False)
    return contextlib.nullcontext(None)


# --------------------------------------------------------------------------- faiss side


def bench_faiss(
    database: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int = 10,
    index_type: str = "auto",
    approx_threshold: int = 20_000,
    approximate: str = "hnsw",
    hnsw: HNSWParams | None = None,
    ivf: IVFParams | None = None,
    sweep: Sequence[int] | None = None,
    n_single: int | None = None,
    progress: bool = True,
    index: VectorIndex | None = None,
    id_offset: int = 0,
) -> tuple[EngineResult, VectorIndex]:
    """Build the index the service would build for these vectors, then sweep its knob
    (efSearch for HNSW, nprobe for IVF; exact has one point).

    Ids are row numbers plus `id_offset` (the command offsets them to the Embedding
    rows it stores), compared with `truth` from `exact_ground_truth`. Returns the
    result and the built index (the command reuses it for the service/API rows).
    """
    n, dim = database.shape
    hnsw = hnsw or HNSWParams()
    ivf = ivf or IVFParams()
    if index is None:
        index = VectorIndex(
            dim,
            index_type=index_type,  # type: ignore[arg-type]
            approx_threshold=approx_threshold,
            approximate=approximate,  # type: ignore[arg-type]
            hnsw=hnsw,
            ivf=ivf,
            normalize=False,  # already normalised: avoids a transient copy of the data
        )
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    with _bar(n, f"faiss build ({index._resolve_type(n)})", progress) as bar:
        cb = (lambda done, total: bar.update(done - bar.n)) if bar is not None else None
        index.rebuild(np.arange(n, dtype=np.int64) + id_offset, database, progress=cb)
    build_s = time.perf_counter() - t0
    rss_delta = max(0, _rss_bytes() - rss0)

    kind = index.index_type
    if kind == "hnsw":
        desc = f"HNSW{index.hnsw_params.m} efConstruction={index.hnsw_params.ef_construction}"
        settings = list(sweep or (16, 32, 64, 128, 256))
    elif kind == "ivf":
        desc = f"IVF{index.params()['nlist']},Flat"
        settings = list(sweep or (8, 16, 32, 64, 128))
    else:
        desc, settings = "Flat (exact)", [None]

    single = queries[: n_single or len(queries)]
    points: list[OperatingPoint] = []
    for value in _iter(settings, "faiss sweep", progress):
        knob = {"ef_search": value} if kind == "hnsw" else {"nprobe": value} if kind == "ivf" else {}
        stats, outs = time_single_queries(lambda q, knob=knob: index.search(q, k, **knob).ids[0], single)
        found = np.stack(outs)
        found = np.where(found >= 0, found - id_offset, -1)
        t0 = time.perf_counter()
        index.search(queries, k, **knob)
        batch_s = time.perf_counter() - t0
        name = "exact" if value is None else ("efSearch" if kind == "hnsw" else "nprobe") + f"={value}"
        points.append(
            OperatingPoint(
                setting=name,
                value=value,
                recall=recall_at_k(found, truth[: len(single)], k),
                p50_ms=stats.p50_ms,
                p99_ms=stats.p99_ms,
                mean_ms=stats.mean_ms,
                qps_single=stats.qps,
                qps_throughput=len(queries) / batch_s,
            )
        )
    result = EngineResult(
        engine="faiss",
        index=desc,
        n=n,
        dim=dim,
        build_s=build_s,
        memory_bytes=index.memory_bytes(),
        points=points,
        extra={
            "rss_delta_bytes": rss_delta,
            "index_type": kind,
            "search_threads": index.search_threads,
            "batch_threads": index.batch_threads,
            "faiss_version": faiss.__version__,
        },
    )
    return result, index


def _iter(items, desc: str, enabled: bool):
    if enabled and tqdm is not None:
        return tqdm(items, desc=desc, leave=False)
    return items


# --------------------------------------------------------------------------- pgvector side


def _copy_binary_rows(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Rows (id bigint, embedding vector) in PostgreSQL's binary COPY row format,
    built with one numpy structured array (no per-row Python)."""
    dim = vectors.shape[1]
    row = np.dtype(
        [
            ("nfields", ">i2"),
            ("id_len", ">i4"),
            ("id", ">i8"),
            ("vec_len", ">i4"),
            ("vec_dim", ">i2"),
            ("vec_unused", ">i2"),
            ("vec", ">f4", (dim,)),
        ]
    )
    out = np.empty(len(ids), row)
    out["nfields"] = 2
    out["id_len"] = 8
    out["id"] = ids
    out["vec_len"] = 4 + 4 * dim
    out["vec_dim"] = dim
    out["vec_unused"] = 0
    out["vec"] = vectors
    return out.tobytes()


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)


def _vector_dumper(conn):
    """A psycopg binary dumper for numpy float32 vectors -> pgvector `vector`."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    info = conn.execute("SELECT oid FROM pg_type WHERE typname = 'vector'").fetchone()
    if info is None:
        raise RuntimeError("the pgvector extension is not installed in this database")

    class VectorDumper(Dumper):
        format = Format.BINARY
        oid = info[0]

        def dump(self, obj: np.ndarray) -> bytes:
            arr = np.asarray(obj, dtype=">f4").ravel()
            return struct.pack(">hh", len(arr), 0) + arr.tobytes()

    return VectorDumper


def _connect(uri: str, *, create_extension: bool = False):
    import psycopg

    conn = psycopg.connect(uri, autocommit=True)
    try:
        if create_extension:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.adapters.register_dumper(np.ndarray, _vector_dumper(conn))
    except BaseException:
        conn.close()
        raise
    return conn


def bench_pgvector(
    uri: str,
    database: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int = 10,
    m: int = 16,
    ef_construction: int = 64,
    sweep: Sequence[int] = (10, 20, 40, 80, 160, 320),
    n_single: int | None = None,
    parallel_workers: int | None = None,
    maintenance_work_mem: str | None = None,
    concurrency: int | None = None,
    schema: str = "precedent_bench",
    progress: bool = True,
) -> EngineResult:
    """Load the same vectors into pgvector, build HNSW (vector_ip_ops), sweep
    hnsw.ef_search. The scratch table is always dropped, even on error."""
    import psycopg
    from psycopg import sql

    n, dim = database.shape
    workers = parallel_workers if parallel_workers is not None else max(1, (os.cpu_count() or 2))
    concurrency = concurrency or max(1, os.cpu_count() or 2)
    if maintenance_work_mem is None:
        # Graph + vectors must fit, or the build falls back to a much slower on-disk path.
        need_mb = int(n * (dim * 4 + 8 + m * 2 * 8 + 64) * 1.4 / 2**20) + 64
        maintenance_work_mem = f"{max(64, need_mb)}MB"
    table = f"bench_{uuid.uuid4().hex[:10]}"
    qualified = sql.Identifier(schema, table)
    index_name = sql.Identifier(f"{table}_hnsw")
    ids = np.arange(n, dtype=np.int64)

    conn = _connect(uri, create_extension=True)
    try:
        versions = conn.execute(
            "SELECT current_setting('server_version'), extversion FROM pg_extension WHERE extname = 'vector'"
        ).fetchone()
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(
            sql.SQL("CREATE UNLOGGED TABLE {} (id bigint NOT NULL, embedding vector({}) NOT NULL)").format(
                qualified, sql.Literal(dim)
            )
        )
        try:
            # ---- load
            t0 = time.perf_counter()
            with conn.cursor() as cur, _bar(n, "pgvector COPY", progress) as bar:
                with cur.copy(
                    sql.SQL("COPY {} (id, embedding) FROM STDIN WITH (FORMAT BINARY)").format(qualified)
                ) as cp:
                    cp.write(_COPY_HEADER)
                    step = 20_000
                    for start in range(0, n, step):
                        cp.write(_copy_binary_rows(ids[start : start + step], database[start : start + step]))
                        if bar is not None:
                            bar.update(min(step, n - start))
                    cp.write(_COPY_TRAILER)
            load_s = time.perf_counter() - t0

            # ---- build
            conn.execute(sql.SQL("ALTER TABLE {} SET (parallel_workers = {})").format(qualified, sql.Literal(workers)))
            conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(sql.Literal(maintenance_work_mem)))
            conn.execute(sql.SQL("SET max_parallel_maintenance_workers = {}").format(sql.Literal(max(0, workers - 1))))
            stop = threading.Event()
            watcher = threading.Thread(
                target=_watch_index_build, args=(uri, schema, table, n, stop, progress), daemon=True
            )
            watcher.start()
            t0 = time.perf_counter()
            try:
                conn.execute(
                    sql.SQL(
                        "CREATE INDEX {} ON {} USING hnsw (embedding vector_ip_ops) WITH (m = {}, ef_construction = {})"
                    ).format(index_name, qualified, sql.Literal(m), sql.Literal(ef_construction))
                )
            finally:
                build_s = time.perf_counter() - t0
                stop.set()
                watcher.join(timeout=5)
            conn.execute(sql.SQL("ANALYZE {}").format(qualified))
            index_bytes, table_bytes = conn.execute(
                "SELECT pg_relation_size(%s::regclass), pg_total_relation_size(%s::regclass)",
                [f"{schema}.{table}_hnsw", f"{schema}.{table}"],
            ).fetchone()

            # ---- query
            query_sql = sql.SQL("SELECT id FROM {} ORDER BY embedding <#> %b LIMIT %b").format(qualified)
            single = queries[: n_single or len(queries)]

            def run(c, q: np.ndarray) -> np.ndarray:
                rows = c.execute(query_sql, (q, k), prepare=True).fetchall()
                out = np.full(k, -1, np.int64)
                out[: len(rows)] = [r[0] for r in rows]
                return out

            points: list[OperatingPoint] = []
            warmed = False
            for ef in _iter(list(sweep), "pgvector sweep", progress):
                conn.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(int(ef))))
                if not warmed:  # first touch reads the index into the page cache
                    for q in single:
                        run(conn, q)
                    warmed = True
                stats, outs = time_single_queries(lambda q: run(conn, q), single)
                found = np.stack(outs)
                throughput = _concurrent_qps(uri, query_sql, queries, k, int(ef), concurrency)
                points.append(
                    OperatingPoint(
                        setting=f"hnsw.ef_search={ef}",
                        value=int(ef),
                        recall=recall_at_k(found, truth[: len(single)], k),
                        p50_ms=stats.p50_ms,
                        p99_ms=stats.p99_ms,
                        mean_ms=stats.mean_ms,
                        qps_single=stats.qps,
                        qps_throughput=throughput,
                    )
                )
        finally:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(qualified))
            with contextlib.suppress(psycopg.Error):  # someone else's table may live there
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(schema)))
    finally:
        conn.close()

    return EngineResult(
        engine="pgvector",
        index=f"HNSW m={m} ef_construction={ef_construction} vector_ip_ops",
        n=n,
        dim=dim,
        build_s=build_s,
        memory_bytes=int(index_bytes),
        points=points,
        extra={
            "load_s": load_s,
            "table_total_bytes": int(table_bytes),
            "parallel_workers": workers,
            "maintenance_work_mem": maintenance_work_mem,
            "concurrency": concurrency,
            "postgres_version": versions[0] if versions else None,
            "pgvector_version": versions[1] if versions else None,
            "table": f"{schema}.{table}",
        },
    )


def _watch_index_build(uri: str, schema: str, table: str, n: int, stop: threading.Event, enabled: bool) -> None:
    """Progress bar from pg_stat_progress_create_index (pgvector reports tuples done)."""
    if not enabled or tqdm is None:
        return
    import psycopg

    with contextlib.suppress(psycopg.Error), psycopg.connect(uri, autocommit=True) as conn:
        bar = tqdm(total=n, desc="pgvector HNSW build", unit="vec", unit_scale=True, leave=False)
        try:
            while not stop.wait(1.0):
                row = conn.execute(
                    "SELECT tuples_done FROM pg_stat_progress_create_index WHERE relid = to_regclass(%s)",
                    [f"{schema}.{table}"],
                ).fetchone()
                if row and row[0] is not None:
                    bar.update(max(0, int(row[0]) - bar.n))
        finally:
            bar.close()


def _concurrent_qps(uri: str, query_sql, queries: np.ndarray, k: int, ef: int, clients: int) -> float:
    """Throughput with `clients` connections each issuing single queries back to back."""
    from psycopg import sql

    parts = np.array_split(np.arange(len(queries)), clients)
    conns = [_connect(uri) for _ in range(clients)]
    try:
        for c in conns:
            c.execute(sql.SQL("SET hnsw.ef_search = {}").format(sql.Literal(ef)))
            for q in queries[:5]:
                c.execute(query_sql, (q, k), prepare=True).fetchall()
        barrier = threading.Barrier(clients + 1)

        def work(c, rows):
            barrier.wait()
            for r in rows:
                c.execute(query_sql, (queries[r], k), prepare=True).fetchall()

        threads = [threading.Thread(target=work, args=(c, p)) for c, p in zip(conns, parts, strict=True)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        return len(queries) / (time.perf_counter() - t0)
    finally:
        for c in conns:
            c.close()


# --------------------------------------------------------------------------- pairing, report


def compare_at_recall(faiss_result: EngineResult, pg_result: EngineResult, target: float = 0.95) -> Comparison:
    """Each engine's fastest (lowest p50) setting reaching `target` recall@k, and the
    QPS ratios between them. None where an engine never reaches the target."""
    f = faiss_result.best_at(target)
    p = pg_result.best_at(target)
    both = f is not None and p is not None
    return Comparison(
        target_recall=target,
        faiss=f,
        pgvector=p,
        qps_ratio_single=f.qps_single / p.qps_single if both else None,
        qps_ratio_throughput=f.qps_throughput / p.qps_throughput if both else None,
        p50_ratio=p.p50_ms / f.p50_ms if both else None,
    )


def machine_info() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": _stdlib_platform.python_version(),
        "machine": _stdlib_platform.machine(),
        "faiss": faiss.__version__,
        "faiss_gpus": faiss.get_num_gpus(),
        "numpy": np.__version__,
    }


def run_benchmark(
    n: int,
    dim: int,
    *,
    uri: str | None = None,
    n_queries: int = 1000,
    k: int = 10,
    seed: int = 0,
    latent_dim: int = 64,
    approx_threshold: int = 20_000,
    approximate: str = "hnsw",
    hnsw: HNSWParams | None = None,
    ivf: IVFParams | None = None,
    faiss_sweep: Sequence[int] | None = None,
    pg_m: int = 16,
    pg_ef_construction: int = 64,
    pg_sweep: Sequence[int] = (10, 20, 40, 80, 160, 320),
    pg_parallel_workers: int | None = None,
    target_recall: float = 0.95,
    progress: bool = True,
    keep_index: bool = False,
) -> BenchReport | tuple[BenchReport, VectorIndex, np.ndarray]:
    """The whole comparison on one data set. `uri=None` skips pgvector.

    keep_index=True returns (report, index, queries) so the command can time the
    service and API on the same index and queries.
    """
    t0 = time.perf_counter()
    database, queries = clustered_vectors(n, dim, n_queries=n_queries, latent_dim=latent_dim, seed=seed)
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = exact_ground_truth(database, queries, k)
    gt_s = time.perf_counter() - t0

    faiss_result, index = bench_faiss(
        database,
        queries,
        truth,
        k=k,
        approx_threshold=approx_threshold,
        approximate=approximate,
        hnsw=hnsw,
        ivf=ivf,
        sweep=faiss_sweep,
        progress=progress,
    )
    pg_result = None
    comparison = None
    if uri:
        pg_result = bench_pgvector(
            uri,
            database,
            queries,
            truth,
            k=k,
            m=pg_m,
            ef_construction=pg_ef_construction,
            sweep=pg_sweep,
            parallel_workers=pg_parallel_workers,
            progress=progress,
        )
        comparison = compare_at_recall(faiss_result, pg_result, target_recall)
    report = BenchReport(
        config={
            "n": n,
            "dim": dim,
            "n_queries": n_queries,
            "k": k,
            "seed": seed,
            "latent_dim": latent_dim,
            "approx_threshold": approx_threshold,
            "approximate": approximate,
            "target_recall": target_recall,
        },
        machine=machine_info(),
        data_s=data_s,
        ground_truth_s=gt_s,
        faiss=faiss_result,
        pgvector=pg_result,
        comparison=comparison,
    )
    if keep_index:
        return report, index, queries
    del database
    return report


def _fmt_bytes(b: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"  # pragma: no cover


def format_table(report: BenchReport) -> str:
    """Plain-text tables: one row per engine setting, then the equal-recall pairing."""
    c = report.config
    lines = [
        f"n={c['n']:,} dim={c['dim']} queries={c['n_queries']} k={c['k']} "
        f"(cpus={report.machine.get('cpus')}, faiss {report.machine.get('faiss')})",
        f"data {report.data_s:.1f} s, exact ground truth {report.ground_truth_s:.1f} s",
        "",
    ]
    engines = [e for e in (report.faiss, report.pgvector) if e is not None]
    for e in engines:
        extra = ""
        if e.engine == "faiss" and e.extra.get("rss_delta_bytes"):
            extra = f", RSS +{_fmt_bytes(e.extra['rss_delta_bytes'])}"
        if e.engine == "pgvector":
            total = _fmt_bytes(e.extra.get("table_total_bytes", 0))
            extra = f", COPY {e.extra.get('load_s', 0):.1f} s, table+index {total}"
        lines.append(f"{e.engine}: {e.index}; build {e.build_s:.1f} s, index {_fmt_bytes(e.memory_bytes)}{extra}")
    lines.append("")
    header = (
        f"{'engine':<9} {'setting':<20} {'recall@' + str(c['k']):>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'QPS 1 client':>13} {'QPS all cores':>14}"
    )
    lines += [header, "-" * len(header)]
    for e in engines:
        for p in e.points:
            lines.append(
                f"{e.engine:<9} {p.setting:<20} {p.recall:>9.3f} {p.p50_ms:>8.3f} {p.p99_ms:>8.3f} "
                f"{p.qps_single:>13,.0f} {p.qps_throughput:>14,.0f}"
            )
    for row in report.extra_rows:
        lines.append(
            f"{row.get('engine', ''):<9} {row.get('setting', ''):<20} {row.get('recall', float('nan')):>9.3f} "
            f"{row.get('p50_ms', float('nan')):>8.3f} {row.get('p99_ms', float('nan')):>8.3f} "
            f"{row.get('qps_single', float('nan')):>13,.0f} {row.get('qps_throughput', float('nan')):>14,.0f}"
        )
    cmp_ = report.comparison
    if cmp_ is not None:
        lines.append("")
        if cmp_.faiss and cmp_.pgvector:
            lines.append(
                f"at recall@{c['k']} >= {cmp_.target_recall}: faiss {cmp_.faiss.setting} "
                f"(recall {cmp_.faiss.recall:.3f}, p50 {cmp_.faiss.p50_ms:.3f} ms) vs pgvector "
                f"{cmp_.pgvector.setting} (recall {cmp_.pgvector.recall:.3f}, p50 {cmp_.pgvector.p50_ms:.3f} ms): "
                f"QPS x{cmp_.qps_ratio_single:.1f} single client, x{cmp_.qps_ratio_throughput:.1f} all cores"
            )
        else:
            missing = "faiss" if cmp_.faiss is None else "pgvector"
            lines.append(f"{missing} never reached recall@{c['k']} >= {cmp_.target_recall} in its sweep")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_arg_parser():
    """Arguments shared by `python -m embeddings.bench` and the Django command."""
    import argparse

    parser = argparse.ArgumentParser(description="FAISS (VectorIndex) vs pgvector HNSW on clustered vectors")
    parser.add_argument("--n", type=int, default=100_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--latent-dim", type=int, default=64, help="intrinsic dimension of the synthetic data")
    parser.add_argument("--approximate", choices=["hnsw", "ivf"], default="hnsw")
    parser.add_argument("--approx-threshold", type=int, default=20_000)
    parser.add_argument("--m", type=int, default=HNSWParams.m, help="faiss HNSW M")
    parser.add_argument("--ef-construction", type=int, default=HNSWParams.ef_construction)
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4*sqrt(n))")
    parser.add_argument("--faiss-sweep", type=int, nargs="*", help="efSearch (HNSW) or nprobe (IVF) values")
    parser.add_argument("--pg-m", type=int, default=16)
    parser.add_argument("--pg-ef-construction", type=int, default=64)
    parser.add_argument("--pg-sweep", type=int, nargs="*", default=[10, 20, 40, 80, 160, 320])
    parser.add_argument("--pg-workers", type=int, default=None, help="parallel_workers for the build")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--uri", default=os.environ.get("DATABASE_URL"), help="PostgreSQL with pgvector")
    parser.add_argument("--pgdata", default=None, help="start an embedded pgserver here when --uri is not given")
    parser.add_argument("--no-pgvector", action="store_true")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> BenchReport:
    args = build_arg_parser().parse_args(argv)
    uri = None if args.no_pgvector else args.uri
    if not uri and not args.no_pgvector:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            pgdata = args.pgdata or os.path.join(os.environ.get("PRECEDENT_HOME", "var"), "bench-postgres")
            uri = pgserver.get_server(pgdata, cleanup_mode="stop").get_uri()
    report = run_benchmark(
        args.n,
        args.dim,
        uri=uri,
        n_queries=args.queries,
        k=args.k,
        seed=args.seed,
        latent_dim=args.latent_dim,
        approx_threshold=args.approx_threshold,
        approximate=args.approximate,
        hnsw=HNSWParams(m=args.m, ef_construction=args.ef_construction),
        ivf=IVFParams(nlist=args.nlist),
        faiss_sweep=args.faiss_sweep,
        pg_m=args.pg_m,
        pg_ef_construction=args.pg_ef_construction,
        pg_sweep=args.pg_sweep,
        pg_parallel_workers=args.pg_workers,
        target_recall=args.target_recall,
        progress=not args.quiet,
    )
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(report.to_json())
    return report


if __name__ == "__main__":  # pragma: no cover
    main()
