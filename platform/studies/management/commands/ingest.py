"""python manage.py ingest PATH...: files, folders (recursive) and DICOMDIRs."""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import connection
from tqdm import tqdm

from precedent.commands import quiet_per_item_logs
from studies import dicom, services
from studies.errors import IngestError
from studies.services import IngestResult, Outcome

log = logging.getLogger(__name__)

# Files met while walking a folder that are documentation or images, not DICOM.
NOT_DICOM_SUFFIXES = {".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".py"}
NOT_DICOM_NAMES = {"README", "LICENSE", "LICENCE", "COPYING"}


def _walkable(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() not in NOT_DICOM_SUFFIXES
        and path.name.upper() not in NOT_DICOM_NAMES
        and not dicom.is_dicomdir(path)
    )


def expand(paths: list[Path]) -> Iterator[Path | IngestResult]:
    """Files to ingest, in a stable order.

    A folder is walked recursively, passing over hidden files, documentation and
    DICOMDIRs (the files a DICOMDIR indexes are in the same tree; a DICOMDIR is known by
    its name or by its File Meta). A DICOMDIR named on the command line is read, and
    each file it references is ingested (missing ones are reported). Any other file
    named on the command line is always tried.
    """
    for path in paths:
        if path.is_dir():
            yield from (child for child in sorted(path.rglob("*")) if _walkable(child))
        elif dicom.is_dicomdir(path):
            try:
                referenced = dicom.dicomdir_files(path)
            except IngestError as exc:
                yield IngestResult(name=str(path), outcome=Outcome.REJECTED, http_status=400, reason=exc.reason)
                continue
            if not referenced:
                yield IngestResult(
                    name=str(path), outcome=Outcome.REJECTED, http_status=400, reason="the DICOMDIR references no files"
                )
            for child in referenced:
                if child.is_file():
                    yield child
                else:
                    yield IngestResult(
                        name=str(child),
                        outcome=Outcome.REJECTED,
                        http_status=404,
                        reason=f"referenced by {path} but missing",
                    )
        else:
            yield path


class Command(BaseCommand):
    help = "Ingest DICOM files, folders (recursively) and DICOMDIRs through the ingest service."

    def add_arguments(self, parser):
        parser.add_argument("paths", nargs="+", type=Path, help="files, folders or DICOMDIR files")
        parser.add_argument(
            "--jobs",
            type=int,
            default=1,
            help="files stored at once, each on its own database connection (default 1). Hashing, fsync and "
            "the database release Python's GIL, so 2-4 help even on few cores",
        )

    @quiet_per_item_logs
    def handle(self, *args, paths: list[Path], jobs: int, **options):
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CommandError(f"no such file or folder: {', '.join(missing)}")
        if jobs < 1:
            raise CommandError(f"--jobs must be at least 1, got {jobs}")
        items = list(expand(paths))
        counts: Counter[Outcome] = Counter()
        rejected: list[IngestResult] = []
        with tqdm(total=len(items), desc="ingest", unit="file", disable=options["verbosity"] == 0) as progress:
            for result in _ingest_all(items, jobs=jobs, progress=progress):
                counts[result.outcome] += 1
                if not result.ok:
                    rejected.append(result)
        for result in rejected:
            self.stdout.write(f"rejected {result.name}: {result.reason}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{counts[Outcome.STORED]} stored, {counts[Outcome.DUPLICATE]} duplicate, "
                f"{counts[Outcome.REJECTED]} rejected"
            )
        )


# Files stored per transaction by each job: the commit and the folder syncs are paid
# once per chunk, and the progress bar still moves often.
CHUNK = 16


def _ingest_chunk(chunk: list[Path | IngestResult]) -> list[IngestResult]:
    """The results of a run of files, stored in one batch (`services.instances_ingest`).

    When the batch trips an error the service did not foresee, nothing of it was stored,
    and each file is tried again on its own: the file behind the error is reported as
    rejected, with the traceback in the log, and the walk goes on.
    """
    paths = [item for item in chunk if isinstance(item, Path)]
    try:
        stored = iter(services.instances_ingest(((p, str(p)) for p in paths), batch_size=len(paths) or 1))
    except Exception:
        log.warning("a batch of %d files failed; storing them one by one", len(paths), exc_info=True)
        return [_ingest(item) for item in chunk]
    return [item if isinstance(item, IngestResult) else next(stored) for item in chunk]


def _ingest(item: Path | IngestResult) -> IngestResult:
    """One file's result. A file that trips an error the service did not foresee is
    reported as rejected, with the traceback in the log, and the walk goes on: the
    service leaves nothing half-written (row and file are stored together or not at all)."""
    if isinstance(item, IngestResult):
        return item
    try:
        return services.instance_ingest(source=item, name=str(item))
    except Exception as exc:
        log.exception("unexpected error ingesting %s", item)
        first_line = (str(exc).splitlines() or [""])[0][:200]
        reason = f"unexpected error, see the log: {type(exc).__name__}: {first_line}"
        return IngestResult(name=str(item), outcome=Outcome.REJECTED, http_status=500, reason=reason)


def _ingest_all(items: list[Path | IngestResult], *, jobs: int, progress: tqdm) -> list[IngestResult]:
    """Every item's result, in the order of `items`, stored by `jobs` threads.

    Each thread takes the next chunk of files until none is left, on its own database
    connection, which it closes when it is done (the embedded PostgreSQL should not keep
    one per thread after the command). Only an interrupt (Ctrl-C) in a thread stops the
    command.
    """
    chunks = [items[start : start + CHUNK] for start in range(0, len(items), CHUNK)]
    if jobs == 1:
        results = []
        for chunk in chunks:
            results.extend(_ingest_chunk(chunk))
            progress.update(len(chunk))
        return results
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for index, chunk in enumerate(chunks):
        todo.put((index, chunk))
    done: queue.SimpleQueue = queue.SimpleQueue()

    def work() -> None:
        try:
            while True:
                try:
                    index, chunk = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    done.put((index, _ingest_chunk(chunk)))
                except BaseException as exc:  # handed to the main thread, which raises it
                    done.put((index, exc))
                    return
        finally:
            connection.close()

    threads = [threading.Thread(target=work, name=f"ingest-{n}", daemon=True) for n in range(min(jobs, len(chunks)))]
    for thread in threads:
        thread.start()
    by_chunk: list[list[IngestResult]] = [[] for _ in chunks]
    for _ in chunks:
        index, result = done.get()
        if isinstance(result, BaseException):
            raise result
        by_chunk[index] = result
        progress.update(len(result))
    for thread in threads:
        thread.join()
    return [result for chunk in by_chunk for result in chunk]
