"""python manage.py store check [--deep] [--fix] [--grace-minutes M]."""

from __future__ import annotations

from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm.auto import tqdm

from studies import services
from studies.storage import DicomStore

SHOWN = 10  # SOP Instance UIDs or paths listed per problem; the counts are whole


class Command(BaseCommand):
    help = (
        "Check the DICOM files, rendered previews and mask files under PRECEDENT_HOME against the database: every "
        "instance's file present at its size (--deep: and its SHA-256), no file without its instance. "
        "--fix removes files, previews and masks nothing in the database has (never a row). Exits 1 when something "
        "is left wrong."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        check = sub.add_parser("check", help="compare the store with the database")
        check.add_argument("--deep", action="store_true", help="also hash every file (reads the whole store)")
        check.add_argument(
            "--fix", action="store_true", help="remove files, previews and masks that nothing in the database has"
        )
        check.add_argument(
            "--grace-minutes",
            type=float,
            default=services.ORPHAN_GRACE_SECONDS / 60,
            help="leave files younger than this alone: an ingest under way places its file before its row "
            "commits (default %(default)g)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["grace_minutes"] < 0:
            raise CommandError("--grace-minutes must be 0 or more")
        with tqdm(total=len(DicomStore.SHARDS), desc="store check", unit="shard", disable=None) as bar:
            report = services.store_check(
                deep=options["deep"],
                fix=options["fix"],
                grace_seconds=options["grace_minutes"] * 60,
                progress=lambda: bar.update(1),
            )
        self.stdout.write(
            f"{report.instances} instances, {report.bytes / 2**20:.1f} MB of files checked by "
            + ("size and SHA-256" if report.hashed else "size (--deep also hashes)")
        )
        self._problem("files missing (instance rows kept)", report.missing)
        self._problem("files damaged: size or SHA-256 differs from the row (rows kept)", report.damaged)
        self._orphans(
            "files no instance has", len(report.orphans), report.orphans_removed, report.orphans_young, options
        )
        for relative in report.orphans[:SHOWN]:
            self.stdout.write(f"  {relative}")
        renderings = f"previews of files no instance has: {report.orphan_renderings}"
        if report.orphan_renderings:
            renderings += f" ({report.orphan_renderings_bytes / 2**20:.1f} MB)"
            renderings += f", {report.orphan_renderings_removed} removed" if options["fix"] else " (--fix removes them)"
        self.stdout.write(renderings)
        consistent = report.consistent
        if apps.is_installed("triage"):  # the detector's and segmenter's masks are files too
            from triage.services import mask_files_check

            masks = mask_files_check(fix=options["fix"], grace_seconds=options["grace_minutes"] * 60)
            self.stdout.write(f"segmentation masks: {masks.rows}, files missing: {masks.missing}")
            self._orphans("mask files no mask has", masks.orphans, masks.orphans_removed, masks.orphans_young, options)
            consistent = consistent and masks.consistent
        cache = services.render_cache()
        usage = cache.usage()
        self.stdout.write(
            f"previews cached: {usage.files} file{'' if usage.files == 1 else 's'}, {usage.bytes / 2**20:.1f} MB of "
            f"{cache.max_bytes / 2**20:.0f} MB (PRECEDENT_RENDER_CACHE_MB)"
        )
        if not consistent:
            raise CommandError("the store and the database disagree (see above)")
        self.stdout.write(self.style.SUCCESS("the store matches the database"))

    def _orphans(self, what: str, found: int, removed: int, young: int, options: dict[str, Any]) -> None:
        line = f"{what}: {found}"
        if found:
            line += f", {removed} removed" if options["fix"] else " (--fix removes them)"
            if young:
                line += f", {young} younger than {options['grace_minutes']:g} min left alone"
        self.stdout.write(line)

    def _problem(self, what: str, uids: list[str]) -> None:
        self.stdout.write(f"{what}: {len(uids)}")
        for uid in uids[:SHOWN]:
            self.stdout.write(f"  {uid}")
        if len(uids) > SHOWN:
            self.stdout.write(f"  … and {len(uids) - SHOWN} more")
