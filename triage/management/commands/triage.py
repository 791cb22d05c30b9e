"""python manage.py triage --pending | --outdated | --all."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from tqdm import tqdm

from precedent.commands import quiet_per_item_logs
from studies.models import Study
from triage import selectors, services


class Command(BaseCommand):
    help = "Triage studies now, in this process (the worker does it as studies arrive)."

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--pending", action="store_true", help="studies not triaged yet, or waiting as pending (e.g. for a model)"
        )
        which.add_argument(
            "--outdated",
            action="store_true",
            help="pending studies and unread ones decided under another operating point or other model versions "
            "than those in use (what a sign-off, activation or retirement starts in the background)",
        )
        which.add_argument("--all", action="store_true", help="every study, checking every image's quality again")

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        if options["all"]:
            studies = Study.objects.order_by("pk")
        elif options["outdated"]:
            studies = services.studies_out_of_date()
        else:
            studies = selectors.studies_awaiting_triage()
        total = studies.count()
        with tqdm(total=total, desc="triage", unit="study", disable=options["verbosity"] == 0) as bar:
            counts = services.triage_studies(studies=studies, recheck=options["all"], progress=bar.update)
        summary = ", ".join(f"{count} {category}" for category, count in counts.most_common()) or "nothing to do"
        self.stdout.write(f"{total} stud{'y' if total == 1 else 'ies'} triaged: {summary}")
