"""python manage.py cohort list | show NAME | split NAME --into A:0.7 B:0.3 [--seed S]
| union NAME --of A B [--exclude-patients-of C D]."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from studies import services
from studies.models import Cohort, Finding


class Command(BaseCommand):
    help = "List cohorts, show one, split one into new cohorts by patient, or join several into a new one."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("list", help="every cohort with its study, patient and abnormal-image counts")
        show = sub.add_parser("show", help="one cohort")
        show.add_argument("name")
        split = sub.add_parser("split", help="patient-level split into new cohorts")
        split.add_argument("name")
        split.add_argument("--into", nargs="+", required=True, metavar="NAME:FRACTION")
        split.add_argument("--seed", type=int, default=0)
        union = sub.add_parser("union", help="a new cohort with the studies of several, less some cohorts' patients")
        union.add_argument("name")
        union.add_argument("--of", nargs="+", required=True, metavar="COHORT", dest="sources")
        union.add_argument(
            "--exclude-patients-of",
            nargs="+",
            default=[],
            metavar="COHORT",
            help="leave out every patient of these cohorts (e.g. the validation and test parts)",
        )

    def handle(self, *args, action: str, **options):
        if action == "split":
            parts = self._parts(options["into"])
            if not Cohort.objects.filter(name=options["name"]).exists():
                raise CommandError(f"no cohort named {options['name']!r}")
            try:
                services.cohort_split(source=options["name"], parts=parts, seed=options["seed"])
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            names = list(parts)
        elif action == "union":
            try:
                services.cohort_union(
                    name=options["name"], sources=options["sources"], exclude_patients_of=options["exclude_patients_of"]
                )
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            names = [options["name"]]
        else:
            names = [options["name"]] if action == "show" else list(Cohort.objects.values_list("name", flat=True))
        for row in self._summaries(names):
            self.stdout.write(
                f"{row.name}: {row.n_studies} studies, {row.n_patients} patients, "
                f"{row.n_abnormal} abnormal images, {row.n_normal} normal images"
            )

    def _parts(self, specs: list[str]) -> dict[str, float]:
        parts = {}
        for spec in specs:
            name, _, fraction = spec.rpartition(":")
            try:
                parts[name] = float(fraction)
            except ValueError:
                raise CommandError(f"--into takes NAME:FRACTION, got {spec!r}") from None
            if not name:
                raise CommandError(f"--into takes NAME:FRACTION, got {spec!r}")
        return parts

    def _summaries(self, names: list[str]):
        rows = Cohort.objects.filter(name__in=names).annotate(
            n_studies=Count("studies", distinct=True),
            n_patients=Count("studies__patient", distinct=True),
            n_abnormal=Count(
                "studies__series__instances",
                filter=Q(studies__series__instances__findings__pathology__in=["benign", "malignant", "unknown"]),
                distinct=True,
            ),
            n_normal=Count(
                "studies__series__instances",
                filter=Q(studies__series__instances__findings__pathology=Finding.Pathology.NORMAL),
                distinct=True,
            ),
        )
        if not rows and names:
            raise CommandError(f"no cohort named {names[0]!r}")
        return rows.order_by("name")
