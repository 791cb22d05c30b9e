"""python manage.py bench_ingest: how fast do we store and index, next to Orthanc?

Synthetic CT (512², ≈0.5 MB) and DX (2500×2048, ≈10 MB) instances with fresh UIDs go
through three paths, in one run so the machine's load is shared alike:

- service: `studies.services.instance_ingest` in this process (no HTTP);
- rest:    `POST /api/v1/instances/` to a gunicorn server started here, with a token;
- orthanc: the same files to Orthanc's `POST /instances` (the reference peer), started
           here on a private folder and a loopback-only port.

Files are built in memory before the clock starts; the clock covers only the store
path. Each (kind, clients) set goes to our REST API and to Orthanc back to back, the
order alternating between sets. The benchmark's patients, studies, files and user are
deleted afterwards (unless --keep).
"""

from __future__ import annotations

import cProfile
import datetime as dt
import io
import json
import os
import platform as stdlib_platform
import pstats
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connection
from rest_framework.authtoken.models import Token
from tqdm import tqdm

from access.services import role_grant
from precedent.commands import quiet_per_item_logs
from precedent.db import connection_url
from precedent.paths import REPO_ROOT
from studies import bench, services
from studies.bench import BenchFile, Figures, ImageKind
from studies.models import Instance, Patient, Study
from studies.services import Outcome

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
BENCH_USER_PREFIX = "bench-ingest-"


@dataclass
class _Servers:
    """Where the servers under test listen (None: not started) and how to warm them."""

    rest_port: int | None = None
    orthanc_port: int | None = None
    token: str = ""
    warm_clients: int = 1


class _ServiceWorker:
    """The in-process path: the service every ingest route calls, fed from memory."""

    def __call__(self, file: BenchFile) -> str | None:
        result = services.instance_ingest(source=io.BytesIO(file.data), name=file.name)
        if result.outcome == Outcome.STORED:
            return None
        return f"{result.outcome}: {result.reason}"

    def close(self) -> None:
        pass


class Command(BaseCommand):
    help = (
        "Benchmark ingest: synthetic CT and DX instances through the ingest service, the REST API "
        "(gunicorn) and Orthanc's REST API, with instances/s, MB/s and p50/p99 per request."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--n",
            type=int,
            default=None,
            help="instances per kind and configuration (default: "
            + ", ".join(f"{k.name} {k.default_n}" for k in bench.KINDS.values())
            + ")",
        )
        parser.add_argument("--kinds", nargs="+", choices=list(bench.KINDS), default=list(bench.KINDS))
        parser.add_argument("--clients", nargs="+", type=int, default=[1, 4], help="concurrent HTTP clients")
        parser.add_argument(
            "--warmup",
            type=int,
            default=3,
            help="untimed instances per client before each measured set (imports, connections)",
        )
        parser.add_argument(
            "--rounds",
            type=int,
            default=3,
            help="interleaved rounds per configuration, each with fresh instances; the median round is reported",
        )
        parser.add_argument("--no-service", action="store_true", help="skip the in-process service path")
        parser.add_argument("--no-rest", action="store_true", help="skip the REST path (no gunicorn)")
        parser.add_argument("--no-orthanc", action="store_true", help="skip the Orthanc reference")
        parser.add_argument(
            "--rest-body",
            nargs="+",
            choices=["raw", "multipart", "batch"],
            default=["raw", "multipart", "batch"],
            help="how files go to our REST API: an application/dicom body (as Orthanc takes them), one multipart "
            "field, and/or --batch-size multipart fields per request (as the upload page and bulk loaders send them)",
        )
        parser.add_argument(
            "--batch-size", type=int, default=8, help="files per request of the batch body (default %(default)s)"
        )
        parser.add_argument("--orthanc", type=Path, default=ORTHANC_BINARY, help="Orthanc binary (default %(default)s)")
        parser.add_argument("--workers", type=int, default=None, help="gunicorn workers (default: most clients)")
        parser.add_argument(
            "--worker-class",
            choices=["gthread", "sync"],
            default="gthread",
            help="gunicorn worker class: gthread (one thread per worker here) keeps the connection open for the "
            "client's next request, as the README's deployment does; sync closes it after each (default %(default)s)",
        )
        parser.add_argument(
            "--json",
            type=Path,
            default=None,
            help="write figures here (default PRECEDENT_HOME/bench/ingest-<time>.json)",
        )
        parser.add_argument(
            "--profile", type=Path, default=None, help="also profile the service path; .prof files here"
        )
        parser.add_argument("--keep", action="store_true", help="leave the benchmark's rows and files in place")
        parser.add_argument(
            "--purge", action="store_true", help="only delete what earlier runs left behind (--keep, interrupted)"
        )

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        if options["purge"]:
            counts = _cleanup(patient_prefix=bench.BENCH_PATIENT_PREFIX, user_prefix=BENCH_USER_PREFIX)
            self.stdout.write(f"purged {_describe(counts)}")
            return
        if (
            any(c < 1 for c in options["clients"])
            or (options["n"] is not None and options["n"] < 1)
            or options["rounds"] < 1
            or options["batch_size"] < 1
        ):
            raise CommandError("--n, --clients, --rounds and --batch-size must be at least 1")

        self.verbosity: int = options["verbosity"]
        kinds = [bench.KINDS[name] for name in dict.fromkeys(options["kinds"])]
        clients: list[int] = list(dict.fromkeys(options["clients"]))
        tag = bench.run_tag()
        bench_dir = Path(settings.PRECEDENT_HOME) / "bench"
        bench_dir.mkdir(parents=True, exist_ok=True)
        out = options["json"] or bench_dir / f"ingest-{dt.datetime.now():%Y%m%d-%H%M%S}.json"

        orthanc_binary: Path | None = None
        if not options["no_orthanc"]:
            if options["orthanc"].is_file() and os.access(options["orthanc"], os.X_OK):
                orthanc_binary = options["orthanc"]
            else:
                self.stdout.write(f"Orthanc reference skipped: no Orthanc binary at {options['orthanc']}")

        rows: list[Figures] = []
        conditions = self._conditions(options, kinds, clients)
        self.bench_user = None
        try:
            with ExitStack() as stack:
                servers = self._start_servers(stack, options, clients, tag, orthanc_binary, conditions)
                for kind in kinds:
                    rows += self._run_kind(kind, servers, options, clients, tag)
        finally:
            # The servers have stopped by now, so nothing writes rows behind the cleanup.
            if options["keep"]:
                self.stdout.write(f"--keep: rows left in place (patients {bench.BENCH_PATIENT_PREFIX}{tag}-*)")
            else:
                prefix = f"{bench.BENCH_PATIENT_PREFIX}{tag}-"
                counts = _cleanup(patient_prefix=prefix, user_prefix=None, user=self.bench_user)
                if self.verbosity:
                    self.stdout.write(f"cleaned up {_describe(counts)}")

        conditions["loadavg_after"] = bench.cpu_conditions()["loadavg"]
        self._report(rows, conditions, out)
        failed = [f for f in rows if f.errors]
        if failed:
            raise CommandError(
                f"{sum(f.errors for f in failed)} instance(s) failed; first: {failed[0].path}: {failed[0].first_error}"
            )

    def _start_servers(
        self,
        stack: ExitStack,
        options: dict[str, Any],
        clients: list[int],
        tag: str,
        orthanc_binary: Path | None,
        conditions: dict[str, Any],
    ) -> _Servers:
        """Start gunicorn and Orthanc (as asked) on `stack`, which stops them again."""
        bench_dir = Path(settings.PRECEDENT_HOME) / "bench"
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=bench_dir))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        # Warm-ups run as many clients as there are gunicorn workers, so that every
        # worker has imported the upload path before the clock starts.
        servers = _Servers(warm_clients=max(clients))
        if not options["no_rest"]:
            self.bench_user = get_user_model().objects.create_user(username=f"{BENCH_USER_PREFIX}{tag}")
            # An integrator uploads over REST (access/policy.py); a user without a role may not.
            role_grant(user=self.bench_user, roles=["integrator"])
            servers.token = Token.objects.create(user=self.bench_user).key
            workers = options["workers"] or max(clients)
            servers.warm_clients = max(servers.warm_clients, workers)
            worker_class = options["worker_class"]
            servers.rest_port = stack.enter_context(self._gunicorn(workdir, workers, worker_class, servers.token)).port
            conditions["rest_server"] = (
                f"gunicorn {workers} {worker_class} workers, precedent.settings.dev with DJANGO_DEBUG=false, "
                "DATABASE_URL to this command's database (CONN_MAX_AGE=60)"
            )
        if orthanc_binary is not None:
            orthanc_dir = workdir / "orthanc"
            orthanc_dir.mkdir()
            servers.orthanc_port = stack.enter_context(bench.orthanc_server(orthanc_binary, orthanc_dir)).port
            conditions["orthanc"] = (
                f"Orthanc {bench.orthanc_version(servers.orthanc_port)} defaults (SyncStorageArea true, "
                "SQLite index, StoreMD5ForAttachments true), no plugins, storage beside PRECEDENT_HOME"
            )
        return servers

    def _run_kind(
        self, kind: ImageKind, servers: _Servers, options: dict[str, Any], clients: list[int], tag: str
    ) -> list[Figures]:
        """Per round: the service path, then per client count one fresh set to our REST
        API and to Orthanc; the median round of each configuration is kept."""
        n = options["n"] or kind.default_n
        targets: list[tuple[str, int, bench.HttpUpload]] = []
        batch_path = f"rest-batch{options['batch_size']}"
        if servers.rest_port is not None:
            for body in dict.fromkeys(options["rest_body"]):
                if body == "batch":
                    targets.append((batch_path, servers.rest_port, bench.rest_batch_upload(servers.token)))
                else:
                    upload = bench.rest_upload(servers.token, raw=body == "raw")
                    targets.append(("rest" if body == "raw" else "rest-multipart", servers.rest_port, upload))
        zip_path = f"orthanc-zip{options['batch_size']}"
        if servers.orthanc_port is not None:
            targets.append(("orthanc", servers.orthanc_port, bench.orthanc_upload()))
            if servers.rest_port is not None and "batch" in options["rest_body"]:
                # The same files per request for Orthanc: its POST /instances takes a ZIP.
                targets.append((zip_path, servers.orthanc_port, bench.orthanc_upload(archive=True)))

        def requests(files: list[BenchFile], path: str) -> list[BenchFile]:
            if path == batch_path:
                return bench.batches(files, options["batch_size"])
            if path == zip_path:
                return bench.zip_batches(files, options["batch_size"])
            return files

        rounds: dict[tuple[str, int], list[Figures]] = {}
        for r in range(options["rounds"]):
            label = f"r{r}"
            if not options["no_service"]:
                figures = self._run_service(kind, n, tag=tag, warmup=options["warmup"], label=label)
                rounds.setdefault(("service", 1), []).append(figures)
            for i, c in enumerate(clients):
                # Fresh instances per target: our store would answer "duplicate" to a set
                # it already took by the other body.
                sets = {
                    path: (
                        requests(
                            bench.make_instances(
                                kind, options["warmup"] * servers.warm_clients, tag=tag, label=f"{label}{path}c{c}w"
                            ),
                            path,
                        ),
                        requests(bench.make_instances(kind, n, tag=tag, label=f"{label}{path}c{c}"), path),
                    )
                    for path, _, _ in targets
                }
                # Alternate who goes first, so that drift in the machine's load hits all alike.
                for path, port, upload in reversed(targets) if (i + r) % 2 else targets:
                    warm, files = sets[path]
                    figures = self._run_http(
                        kind, path, port, upload, warm, files, clients=c, warm_clients=servers.warm_clients
                    )
                    rounds.setdefault((path, c), []).append(figures)
        if not options["no_service"] and options["profile"]:
            self._profile_service(kind, n, tag=tag, folder=options["profile"])
        return [bench.median_round(figures) for figures in rounds.values()]

    # --- the three paths ---------------------------------------------------------------

    def _run_service(self, kind: ImageKind, n: int, *, tag: str, warmup: int, label: str = "") -> Figures:
        warm = bench.make_instances(kind, warmup, tag=tag, label=f"{label}sw")
        files = bench.make_instances(kind, n, tag=tag, label=f"{label}s")
        bench.run_timed(warm, _ServiceWorker, clients=1, figures=Figures(kind.name, "warmup", 1))
        with self._progress(kind, "service", 1, len(files)) as progress:
            return bench.run_timed(
                files, _ServiceWorker, clients=1, figures=Figures(kind.name, "service", 1), progress=progress
            )

    def _run_http(
        self,
        kind: ImageKind,
        path: str,
        port: int,
        upload: bench.HttpUpload,
        warm: list[BenchFile],
        files: list[BenchFile],
        *,
        clients: int,
        warm_clients: int,
    ) -> Figures:
        def make_worker() -> bench.HttpWorker:
            return bench.HttpWorker(port, upload)

        warm_figures = bench.run_timed(
            warm, make_worker, clients=warm_clients, figures=Figures(kind.name, "warmup", warm_clients)
        )
        if warm_figures.errors:
            raise CommandError(f"{path} rejects the warm-up: {warm_figures.first_error}")
        with self._progress(kind, path, clients, len(files)) as progress:
            return bench.run_timed(
                files, make_worker, clients=clients, figures=Figures(kind.name, path, clients), progress=progress
            )

    def _profile_service(self, kind: ImageKind, n: int, *, tag: str, folder: Path) -> None:
        """A separate, untimed run under cProfile: where the service spends its time."""
        folder.mkdir(parents=True, exist_ok=True)
        files = bench.make_instances(kind, n, tag=tag, label="p")
        profiler = cProfile.Profile()
        profiler.enable()
        figures = bench.run_timed(files, _ServiceWorker, clients=1, figures=Figures(kind.name, "profile", 1))
        profiler.disable()
        target = folder / f"service-{kind.name}.prof"
        profiler.dump_stats(target)
        stats = pstats.Stats(str(target))
        self.stdout.write(f"\nservice profile, {kind.name}, {figures.instances} instances (cProfile; {target}):")
        for label, ms, calls in bench.profile_phases(stats, figures.instances):
            self.stdout.write(f"  {label:<38} {ms:8.2f} ms/instance  ({calls} calls)")

    # --- servers and conditions --------------------------------------------------------

    @contextmanager
    def _gunicorn(self, workdir: Path, workers: int, worker_class: str, token: str) -> Iterator[bench.ServerProcess]:
        """The project's WSGI app under gunicorn, on the database this command uses.

        precedent.wsgi defaults to production settings (secret from the environment,
        HTTPS redirects), so the server runs precedent.settings.dev with DEBUG off (DEBUG
        would make Django record every SQL statement). DATABASE_URL is built from this
        process's live connection so the server sees the same database, also the test
        database under pytest.
        """
        port = bench.free_port()
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "precedent.settings.dev",
            "DJANGO_DEBUG": "false",
            "PRECEDENT_HOME": str(settings.PRECEDENT_HOME),
            "DATABASE_URL": connection_url(),
            "PRECEDENT_FSYNC": "true" if settings.PRECEDENT_FSYNC else "false",
            "PRECEDENT_MAX_UPLOAD_BYTES": str(settings.PRECEDENT_MAX_UPLOAD_BYTES),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "PRECEDENT_LOG_LEVEL": "WARNING",
        }
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(REPO_ROOT / "platform"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            worker_class,
            *(["--threads", "1"] if worker_class == "gthread" else []),
            "--timeout",
            "300",
            "--graceful-timeout",
            "5",
            "--log-level",
            "warning",
            "precedent.wsgi:application",
        ]
        server = bench.ServerProcess(
            "gunicorn",
            args,
            port=port,
            ready_path="/api/v1/studies/?page_size=1",
            ready_headers={"Authorization": f"Token {token}"},
            log_path=workdir / "gunicorn.log",
            env=env,
            cwd=REPO_ROOT,
        )
        with server:
            yield server

    def _conditions(self, options: dict[str, Any], kinds: list[ImageKind], clients: list[int]) -> dict[str, Any]:
        with connection.cursor() as cursor:
            pg = {}
            for name in ("server_version", "fsync", "synchronous_commit"):
                cursor.execute(f"SHOW {name}")
                pg[name] = cursor.fetchone()[0]
        return {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "argv": " ".join(sys.argv),
            **bench.cpu_conditions(),
            "python": stdlib_platform.python_version(),
            "kinds": {k.name: k.description for k in kinds},
            "clients": clients,
            "warmup_per_client": options["warmup"],
            "precedent_fsync": settings.PRECEDENT_FSYNC,
            "postgresql": pg,
            "database": settings.DATABASES["default"]["ENGINE"],
            "command_debug": settings.DEBUG,
            "service_source": "BytesIO (in memory)",
        }

    @contextmanager
    def _progress(self, kind: ImageKind, path: str, clients: int, total: int) -> Iterator[Callable[[int], object]]:
        bar = tqdm(
            total=total,
            desc=f"{kind.name} {path} ×{clients}",
            unit="inst",
            leave=False,
            disable=True if self.verbosity == 0 else None,
            file=sys.stderr,
        )
        try:
            yield bar.update
        finally:
            bar.close()

    def _report(self, rows: list[Figures], conditions: dict[str, Any], out: Path) -> None:
        self.stdout.write("")
        for key, value in conditions.items():
            if key not in ("argv",):
                self.stdout.write(f"{key}: {value}")
        self.stdout.write("")
        self.stdout.write(bench.format_table(rows))
        for line in bench.ratios(rows):
            self.stdout.write(line)
        # Several files per request on both sides: our multipart batch against Orthanc's ZIP.
        for batch in sorted({f.path for f in rows if f.path.startswith("rest-batch")}):
            for line in bench.ratios(rows, ours=batch, reference=batch.replace("rest-batch", "orthanc-zip")):
                self.stdout.write(line)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"conditions": conditions, "results": [f.as_dict() for f in rows]}, indent=2))
        self.stdout.write(f"figures written to {out}")


def _cleanup(*, patient_prefix: str, user_prefix: str | None, user: Any = None) -> dict[str, int]:
    """Delete benchmark rows through the ORM, so each Instance's file goes after commit."""
    patients = Patient.objects.filter(patient_id__startswith=patient_prefix)
    _, deleted = Instance.objects.filter(series__study__patient__in=patients).delete()
    counts = {"instances": deleted.get("studies.Instance", 0)}
    counts["studies"] = Study.objects.filter(patient__in=patients).count()
    Study.objects.filter(patient__in=patients).delete()
    counts["patients"] = patients.delete()[0]
    users = get_user_model().objects.none()
    if user is not None:
        users = get_user_model().objects.filter(pk=user.pk)
    elif user_prefix:
        users = get_user_model().objects.filter(username__startswith=user_prefix)
    counts["users"] = users.count()
    users.delete()
    return counts


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{value} {key}" for key, value in counts.items())
