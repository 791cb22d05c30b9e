"""python manage.py calibrate_triage --cohort NAME [--score {classifier,detector,fused}] [--target-sensitivity 1.0]
[--classifier NAME] [--detector NAME] [--sign-off USERNAME] [--allow-training-patients]."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from precedent.commands import quiet_per_item_logs
from studies.models import Cohort
from triage import selectors, services
from triage.exam_score import LABELS, SOURCES


class Command(BaseCommand):
    help = (
        "Score a (patient-level validation) cohort with the active models, compute the exam-level ROC and workload "
        "curves of the chosen score and store the threshold that keeps the target sensitivity as an operating point "
        "(with the score source and model versions), not signed off. --sign-off USERNAME signs it off at once "
        "(audited), for scripted setups."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cohort", required=True)
        parser.add_argument(
            "--score",
            choices=SOURCES,
            default=None,
            help="the exam score to threshold: the classifier's P(abnormal), the detector's best box, or both fused "
            "(noisy-OR); default: the detector's when a detector is active, else the classifier's",
        )
        parser.add_argument("--target-sensitivity", type=float, default=1.0, help="exam level, in (0, 1]")
        parser.add_argument("--sign-off", metavar="USERNAME", default="", help="sign the new point off as this user")
        parser.add_argument(
            "--allow-training-patients",
            action="store_true",
            help="calibrate even on patients a model was trained on (a demonstration, never a deployment: the point "
            "records how many, and the calibration page shows it)",
        )
        for kind in ("classifier", "detector"):
            parser.add_argument(
                f"--{kind}",
                default=None,
                metavar="NAME",
                help=f"calibrate on this registered {kind} version instead of the active one (a candidate: the point, "
                "once signed off, applies from the moment the version is activated, so a switch leaves no gap)",
            )

    @quiet_per_item_logs
    def handle(self, *args: Any, **options: Any) -> None:
        cohort = Cohort.objects.filter(name=options["cohort"]).first()
        if cohort is None:
            raise CommandError(f"no cohort named {options['cohort']!r}")
        target = options["target_sensitivity"]
        if not 0.0 < target <= 1.0:
            raise CommandError(f"--target-sensitivity must be in (0, 1], got {target}")
        user = None
        if options["sign_off"]:
            user = get_user_model().objects.filter(username=options["sign_off"]).first()
            if user is None:
                raise CommandError(f"no user named {options['sign_off']!r}")
            if not selectors.user_can_sign_off(user=user):
                raise CommandError(f"{options['sign_off']} is not an admin: only an admin signs off operating points")
        if not cohort.studies.exists():
            raise CommandError(f"cohort {cohort.name!r} is empty")
        try:
            # Candidates named on the command line; the active versions otherwise.
            named = {
                kind: services.triage_model_named_or_active(kind, options[kind])
                for kind in ("classifier", "detector")
                if options[kind]
            }
            point = services.operating_point_compute(
                cohort=cohort,
                target_sensitivity=target,
                source=options["score"],
                progress=options["verbosity"] > 0,
                models=named,
                allow_training_patients=options["allow_training_patients"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        v = point.validation
        self.stdout.write(
            f"operating point {point.pk}: threshold {point.threshold:.4f} on the {LABELS[point.score_source]} "
            f"({', '.join(v.name for v in point.model_versions.all())}) keeps sensitivity "
            f"{point.sensitivity:.3f} (target {target:g}; {_counted(v, 'sensitivity')}), specificity "
            f"{point.specificity:.3f} ({_counted(v, 'specificity')}), workload reduction "
            f"{point.workload_reduction:.3f} on {v['exams']} exams of {v['patients']} patients "
            f"({v['abnormal_exams']} abnormal); AUC {_fmt(v['auc_abnormal'])}, normals ruled out at 100 % "
            f"sensitivity {_fmt(v['rule_out_at_full_sensitivity'])}"
        )
        for name, count in (v.get("training_patients") or {}).items():
            self.stdout.write(f"warning: {count} of these {v['patients']} patients are in {name}'s training cohort")
        waiting = [v.name for v in point.model_versions.all() if v.status != v.Status.ACTIVE]
        if waiting:
            self.stdout.write(
                f"calibrated on {', '.join(waiting)}, not active: once signed off, the point applies when "
                f"`triage_model activate` switches to {'it' if len(waiting) == 1 else 'them'}"
            )
        if user is not None:
            try:
                services.operating_point_sign_off(point=point, user=user, via="command")
            except ValueError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(f"signed off by {user.get_username()}; pending studies are re-triaged")
        else:
            self.stdout.write("not signed off: an admin signs it off on the calibration page (or use --sign-off)")


def _counted(validation: dict, figure: str) -> str:
    """The counts behind a figure and their exact interval, e.g. 15/15, 95 % CI 0.782–1.000."""
    (hits, of), ci = validation[f"{figure}_counts"], validation[f"{figure}_ci95"]
    return f"{hits}/{of}" + (f", 95 % CI {ci[0]:.3f}–{ci[1]:.3f}" if ci else "")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
