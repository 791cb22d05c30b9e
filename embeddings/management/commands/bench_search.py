"""python manage.py bench_search --n 100000 --dim 512: FAISS vs pgvector, and our service.

Clustered synthetic vectors are stored as Embedding rows of a throw-away encoder
version, so the measured search runs through the same code as a radiologist's:

1. faiss: the index on its own (build time, memory, recall@10 against exact search,
   single-query p50/p99 and batched QPS over an efSearch/nprobe sweep);
2. pgvector HNSW (the embedded PostgreSQL has the extension) on the same vectors and
   queries, swept over hnsw.ef_search, paired with faiss at equal recall;
3. service: `selectors.similar_cases(vector=...)` on that index: index catch-up
   check, search, and the SQL that turns hits into instances, studies and findings;
4. API: POST /api/v1/search/ with the query vector, in-process through Django's full
   request stack (middleware, DRF, token auth, JSON), without a network hop.

Everything the run stores is deleted afterwards.
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection, transaction
from django.test import Client
from rest_framework.authtoken.models import Token
from tqdm import tqdm

from access import policy
from access.services import role_grant
from precedent.commands import quiet_per_item_logs

from embeddings import bench  # isort: skip - imports faiss before torch
from embeddings import selectors, services
from embeddings.models import Embedding, EncoderVersion
from precedent.db import connection_url
from studies import bench as study_bench
from studies import services as study_services
from studies.models import Instance, Patient, Study

FILLERS = 4  # instances the synthetic embeddings hang on (hits need an instance)
USER = "bench-search"


class Command(BaseCommand):
    help = "Benchmark similar-case search: faiss index, pgvector, our search service and API, in one run."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--n", type=int, default=100_000, help="vectors (default %(default)s)")
        parser.add_argument("--dim", type=int, default=512)
        parser.add_argument("--queries", type=int, default=1000)
        parser.add_argument("--single", type=int, default=300, help="queries timed one by one for service and API")
        parser.add_argument("--k", type=int, default=10)
        parser.add_argument("--no-pgvector", action="store_true")
        parser.add_argument("--pg-m", type=int, default=16)
        parser.add_argument("--pg-ef-construction", type=int, default=64)
        parser.add_argument("--json", type=Path, help="write the figures here as JSON")

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        n, dim, k = options["n"], options["dim"], options["k"]
        if n < 1000 or dim < 8 or not 1 <= k <= selectors.MAX_K:
            raise CommandError(f"need --n >= 1000, --dim >= 8 and 1 <= --k <= {selectors.MAX_K}")
        progress = options["verbosity"] > 0
        self.stdout.write(f"data: {n:,} clustered vectors × {dim}, {options['queries']} queries")
        t0 = time.perf_counter()
        database, queries = bench.clustered_vectors(n, dim, n_queries=options["queries"])
        data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, truth = bench.exact_ground_truth(database, queries, k)
        truth_s = time.perf_counter() - t0

        encoder = _bench_encoder(dim)
        try:
            base = self._store(encoder, database, progress)
            faiss_result, index = bench.bench_faiss(
                database,
                queries,
                truth,
                k=k,
                approx_threshold=settings.PRECEDENT_INDEX_APPROX_THRESHOLD,
                progress=progress,
                id_offset=base,
            )
            pg_result = comparison = None
            if not options["no_pgvector"]:
                pg_result = bench.bench_pgvector(
                    connection_url(),
                    database,
                    queries,
                    truth,
                    k=k,
                    m=options["pg_m"],
                    ef_construction=options["pg_ef_construction"],
                    progress=progress,
                )
                comparison = bench.compare_at_recall(faiss_result, pg_result)
            del database
            services.serve_prebuilt(encoder, "region", index)
            single = queries[: options["single"]]
            rows = [
                self._service_row(encoder, single, truth, base, k),
                # Every filler is a CT: the filter all rows pass, as "Find similar" sends
                # it (by the image's modality) in a single-modality archive.
                self._service_row(encoder, single, truth, base, k, filters=selectors.SearchFilters(modality="CT")),
                self._api_row(encoder, single, truth, base, k),
            ]
        finally:
            _cleanup(encoder)
        report = bench.BenchReport(
            config={"n": n, "dim": dim, "n_queries": len(queries), "k": k, "approx_threshold": index.approx_threshold},
            machine=bench.machine_info(),
            data_s=data_s,
            ground_truth_s=truth_s,
            faiss=faiss_result,
            pgvector=pg_result,
            comparison=comparison,
            extra_rows=rows,
        )
        self.stdout.write(bench.format_table(report))
        if options["json"]:
            options["json"].write_text(report.to_json())
            self.stdout.write(f"figures written to {options['json']}")

    def _store(self, encoder: EncoderVersion, database: np.ndarray, progress: bool) -> int:
        """COPY the vectors in as region embeddings of a few filler instances; returns
        the id of the first, so that index ids are the rows' ids."""
        fillers = _fillers()
        table = Embedding._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_get_serial_sequence(%s, 'id')", [table])
            sequence = cursor.fetchone()[0]
            cursor.execute("SELECT nextval(%s)", [sequence])
            base = cursor.fetchone()[0]
            cursor.execute("SELECT setval(%s, %s)", [sequence, base + len(database)])
        columns = "id, instance_id, encoder_id, kind, frame, x0, y0, x1, y1, vector, created_at"
        now = time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime())
        raw = connection.connection  # psycopg's own connection, for COPY
        with transaction.atomic(), raw.cursor() as cursor:
            with cursor.copy(f'COPY "{table}" ({columns}) FROM STDIN') as copy:
                for i, vector in enumerate(tqdm(database, desc="store embeddings", unit="vec", disable=not progress)):
                    copy.write_row(
                        (
                            base + i,
                            fillers[i % len(fillers)],
                            encoder.pk,
                            "region",
                            1,
                            0,
                            0,
                            1,
                            1,
                            vector.tobytes(),
                            now,
                        )
                    )
        with connection.cursor() as cursor:
            # As autovacuum would soon after a bulk load: without statistics the planner
            # takes the 100k fresh rows for a small table and joins them by a full scan.
            cursor.execute(f'ANALYZE "{table}"')
        return base

    def _service_row(self, encoder, single, truth, base: int, k: int, filters=None) -> dict[str, Any]:
        setting = "similar_cases()" if filters is None else "similar_cases(modality=CT)"
        filters = dataclasses.replace(filters or selectors.SearchFilters(), exclude_same_patient=False)

        def search(q):
            hits = selectors.similar_cases(vector=q, encoder=encoder, kind="region", k=k, filters=filters).hits
            return np.array([h.embedding_id for h in hits], dtype=np.int64)

        return _row("service", setting, search, single, truth, base, k)

    def _api_row(self, encoder, single, truth, base: int, k: int) -> dict[str, Any]:
        user, _ = get_user_model().objects.get_or_create(username=USER)
        role_grant(user=user, roles=[policy.RADIOLOGIST])  # search is a radiologist's permission
        token, _ = Token.objects.get_or_create(user=user)
        client = Client(HTTP_AUTHORIZATION=f"Token {token.key}", SERVER_NAME=settings.ALLOWED_HOSTS[0])

        def search(q):
            body = {"vector": q.tolist(), "encoder": encoder.name, "kind": "region", "k": k,
                    "exclude_same_patient": False}  # fmt: skip
            response = client.post("/api/v1/search/", json.dumps(body), content_type="application/json")
            if response.status_code != 200:
                raise CommandError(f"search API answered {response.status_code}: {response.content[:300]!r}")
            return np.array([r["embedding_id"] for r in response.json()["results"]], dtype=np.int64)

        return _row("api", "POST /api/v1/search/", search, single, truth, base, k)


def _row(engine: str, setting: str, search, single, truth, base: int, k: int) -> dict[str, Any]:
    stats, outputs = bench.time_single_queries(search, single)
    found = np.full((len(outputs), k), -1, dtype=np.int64)
    for row, ids in enumerate(outputs):
        found[row, : len(ids)] = ids - base
    recall = bench.recall_at_k(found, truth[: len(single)], k)
    return {"engine": engine, "setting": setting, "recall": recall, **_latency(stats)}


def _latency(stats: bench.LatencyStats) -> dict[str, float]:
    return {"p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms, "qps_single": stats.qps, "qps_throughput": float("nan")}


def _bench_encoder(dim: int) -> EncoderVersion:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return EncoderVersion.objects.create(
        name=f"bench-search-{stamp}", architecture="synthetic", dim=dim, input_size=0, weights_path="",
        weights_sha256="", metadata={"bench": True},
    )  # fmt: skip


def _fillers() -> list[int]:
    """A few real instances for the embeddings to belong to (a hit needs an instance,
    a series, a study and a patient), under the benchmark's patient prefix."""
    files = study_bench.make_instances(study_bench.KINDS["ct"], FILLERS, tag=study_bench.run_tag(), label="search")
    return [study_services.instance_ingest(source=io.BytesIO(f.data), name=f.name).instance.pk for f in files]


def _cleanup(encoder: EncoderVersion) -> None:
    """Delete the run's rows: embeddings in bulk (one statement instead of a tombstone
    each: their encoder goes too), then the filler patients through the ORM so their
    files go as well."""
    services.forget_indexes()
    with connection.cursor() as cursor:
        cursor.execute(f'DELETE FROM "{Embedding._meta.db_table}" WHERE encoder_id = %s', [encoder.pk])
    encoder.delete()
    patients = Patient.objects.filter(patient_id__startswith=study_bench.BENCH_PATIENT_PREFIX)
    Instance.objects.filter(series__study__patient__in=patients).delete()
    Study.objects.filter(patient__in=patients).delete()
    patients.delete()
    get_user_model().objects.filter(username=USER).delete()
