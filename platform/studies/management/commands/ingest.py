"""python manage.py ingest PATH...: files, folders (recursive) and DICOMDIRs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from studies import dicom, services
from studies.errors import IngestError
from studies.services import IngestResult, Outcome

# Files met while walking a folder that are documentation or images, not DICOM.
NOT_DICOM_SUFFIXES = {".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".py"}
NOT_DICOM_NAMES = {"README", "LICENSE", "LICENCE", "COPYING"}


def _walkable(path: Path) -> bool:
    return (
        path.is_file()
        and not path.name.startswith(".")
        and not dicom.is_dicomdir_name(path)
        and path.suffix.lower() not in NOT_DICOM_SUFFIXES
        and path.name.upper() not in NOT_DICOM_NAMES
    )


def expand(paths: list[Path]) -> Iterator[Path | IngestResult]:
    """Files to ingest, in a stable order.

    A folder is walked recursively, passing over hidden files, documentation and
    DICOMDIRs (the files a DICOMDIR indexes are in the same tree). A DICOMDIR named on
    the command line is read, and each file it references is ingested (missing ones
    are reported). A file named on the command line is always tried.
    """
    for path in paths:
        if path.is_dir():
            yield from (child for child in sorted(path.rglob("*")) if _walkable(child))
        elif dicom.is_dicomdir_name(path):
            try:
                referenced = dicom.dicomdir_files(path)
            except IngestError as exc:
                yield IngestResult(name=str(path), outcome=Outcome.REJECTED, http_status=400, reason=exc.reason)
                continue
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

    def handle(self, *args, paths: list[Path], **options):
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CommandError(f"no such file or folder: {', '.join(missing)}")
        items = list(expand(paths))
        counts: Counter[Outcome] = Counter()
        rejected: list[IngestResult] = []
        for item in tqdm(items, desc="ingest", unit="file", disable=options["verbosity"] == 0):
            result = item if isinstance(item, IngestResult) else services.instance_ingest(source=item, name=str(item))
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
