"""`manage.py audit_export --since DATE [--until DATE] [--user U] [--action A] --out FILE`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from access.csv_export import csv_lines
from access.models import Via
from access.selectors import audit_events
from access.services import audit_record
from precedent.files import atomic_write


def parse_date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"not a date (YYYY-MM-DD): {value!r}")


class Command(BaseCommand):
    help = "Write the audit log (optionally filtered) as CSV."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--since", help="first day, YYYY-MM-DD (inclusive)")
        parser.add_argument("--until", help="last day, YYYY-MM-DD (inclusive)")
        parser.add_argument("--user", default="", help="only this username")
        parser.add_argument("--action", default="", help="only this action (view, search, download, ...)")
        parser.add_argument("--out", required=True, help="the CSV file to write ('-' for standard output)")

    def handle(self, *args, **options) -> None:
        since = parse_date(options["since"]) if options["since"] else None
        until = parse_date(options["until"]) if options["until"] else None
        if since and until and since > until:
            raise CommandError("--until is before --since")
        events = audit_events(username=options["user"], action=options["action"], since=since, until=until)
        total = events.count()
        lines = csv_lines(tqdm(events.iterator(chunk_size=2000), total=total, unit="event", disable=None))
        out = options["out"]
        if out == "-":
            for line in lines:
                self.stdout.write(line, ending="")
        else:
            self.write_atomically(Path(out), lines)
            self.stderr.write(f"wrote {total} events to {out}")
        audit_record(
            action="export",
            via=Via.COMMAND,
            target_type="audit-log",
            details={"events": total, "since": options["since"], "until": options["until"], "out": str(out)},
        )

    @staticmethod
    def write_atomically(path: Path, lines) -> None:
        """Temp file + rename: a failed export leaves no half-written CSV behind."""
        if not path.parent.is_dir():
            raise CommandError(f"no such folder: {path.parent}")
        with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
            handle.writelines(lines)
