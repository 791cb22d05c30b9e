"""python manage.py triage_model list [--kind K] | activate NAME | retire NAME."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Q

from precedent.commands import quiet_per_item_logs
from triage import selectors, services
from triage.models import TriageModelVersion


class Command(BaseCommand):
    help = (
        "List the registered triage model versions, switch which one serves triage (the previous one is retired), "
        "or retire one. Switches are audited; studies waiting as pending are re-triaged after an activation."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="every version, newest first, with its status and signed-off points")
        listing.add_argument("--kind", choices=TriageModelVersion.Kind.values, default=None)
        activate = sub.add_parser(
            "activate",
            help="serve triage with this version (evaluate_triage/calibrate_triage --KIND NAME first: a point "
            "signed off on it applies at once)",
        )
        activate.add_argument("name")
        retire = sub.add_parser("retire", help="take this version out of service (what needed it waits as pending)")
        retire.add_argument("name")

    @quiet_per_item_logs
    def handle(self, *args: Any, action: str, **options: Any) -> None:
        if action in ("activate", "retire"):
            version = TriageModelVersion.objects.filter(name=options["name"]).first()
            if version is None:
                raise CommandError(f"no triage model version named {options['name']!r}")
            was = version.status
            if action == "activate":
                services.triage_model_activate(version=version, via="command")
            else:
                services.triage_model_retire(version=version, via="command")
            if version.status == was:
                self.stdout.write(f"{version.name} is {version.status} already: nothing changed")
            else:
                self.stdout.write(f"{version.kind} {version.name}: {was} → {version.status}")
                point = selectors.signed_off_point()
                self.stdout.write(
                    f"triage uses operating point {point.pk} ({point.score_source} score, threshold "
                    f"{point.threshold:.4f})"
                    if point is not None
                    else "no signed-off operating point applies to the active models: studies wait as pending"
                )
            options["kind"] = version.kind
        self._list(options.get("kind"))

    def _list(self, kind: str | None) -> None:
        versions = TriageModelVersion.objects.annotate(
            signed_off_points=Count("operating_points", filter=Q(operating_points__signed_off_at__isnull=False))
        ).order_by("kind", "-created_at")
        if kind:
            versions = versions.filter(kind=kind)
        for version in versions:
            summary = version.metadata.get("training", {}).get("summary", "")
            activated = f", activated {version.activated_at:%Y-%m-%d %H:%M}" if version.activated_at else ""
            self.stdout.write(
                f"{version.kind:<10} {version.name}  {version.status}{activated}, created "
                f"{version.created_at:%Y-%m-%d %H:%M}, {version.signed_off_points} signed-off point(s)"
                + (f"\n{'':<11}{summary}" if summary else "")
            )
        if not versions:
            self.stdout.write("no triage model versions" + (f" of kind {kind}" if kind else ""))
