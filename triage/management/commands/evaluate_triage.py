"""python manage.py evaluate_triage --cohort NAME [--json] [--out DIR] [--threshold T] [--score SOURCE]."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from studies.models import Cohort, Instance
from triage import metrics, selectors, services
from triage.exam_score import LABELS, NEEDS, SOURCES
from triage.models import TriageModelVersion

DEFAULT_THRESHOLD = 0.5  # stated in the output when no operating point is signed off
SCORING_KINDS = ("classifier", "detector")  # the models an exam score comes from
MODEL_KINDS = (*SCORING_KINDS, "segmenter")


class Command(BaseCommand):
    help = (
        "Evaluate the active triage models (or candidates named with --classifier/--detector/--segmenter) on a "
        "labelled (patient-level test) cohort: AUC normal-vs-abnormal of "
        "the exam score the signed-off operating point was calibrated on (classifier, detector or fused; the other "
        "scores the active models allow alongside) and benign-vs-malignant, at exam and image level, "
        "sensitivity/specificity/workload reduction at the signed-off operating point, normals ruled out at 100 % "
        "sensitivity, FROC and Dice of the localiser; ROC and workload curves as PNG."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cohort", required=True)
        parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
        parser.add_argument(
            "--out",
            type=Path,
            default=None,
            help="folder for the ROC/workload and FROC curves as PNG "
            "(default: PRECEDENT_HOME/evaluations/triage-COHORT, replaced by each run)",
        )
        parser.add_argument(
            "--threshold",
            type=float,
            default=None,
            help=f"threshold on the exam score when no operating point is signed off (default {DEFAULT_THRESHOLD})",
        )
        for kind in MODEL_KINDS:
            parser.add_argument(
                f"--{kind}",
                default=None,
                metavar="NAME",
                help=f"evaluate this registered {kind} version instead of the active one (a candidate, before "
                "activating it: nothing changes for triage)",
            )
        parser.add_argument(
            "--score",
            choices=SOURCES,
            default=None,
            help="the exam score when no operating point is signed off (default: as calibrate_triage's); with a "
            "signed-off point its own score is evaluated",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        cohort = Cohort.objects.filter(name=options["cohort"]).first()
        if cohort is None:
            raise CommandError(f"no cohort named {options['cohort']!r}")
        if not cohort.studies.exists():
            raise CommandError(f"cohort {cohort.name!r} is empty")
        if options["out"] is None:
            safe = re.sub(r"[^\w.-]", "_", cohort.name)
            options["out"] = Path(settings.PRECEDENT_HOME) / "evaluations" / f"triage-{safe}"
        try:
            loaded = {kind: services.triage_model_named_or_active(kind, options[kind]) for kind in MODEL_KINDS}
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        scoring = {k: m.version for k, m in loaded.items() if m is not None and k in SCORING_KINDS}
        # A signed-off point applies only to the very versions it was calibrated on.
        point = selectors.signed_off_point(active=scoring)
        other_point = None
        if point is not None and options["score"] and options["score"] != point.score_source:
            # The asked score has no signed-off threshold here (the point thresholds
            # another): it is evaluated at --threshold, and the text says so.
            other_point, point = point, None
        source = point.score_source if point else options["score"] or services.default_score_source(scoring)
        for kind in NEEDS[source]:
            if loaded[kind] is None:
                raise CommandError(
                    f"no {kind} is active (the {source} score needs one): train one with train_triage --model {kind}"
                    f" --activate, or name one with --{kind}"
                )
        classifier, detector = loaded["classifier"], loaded["detector"]
        progress = options["verbosity"] > 0 and not options["json"]
        try:
            # The images triage would score: checked for quality first, as on arrival.
            services.assess_cohort_images(cohort, progress=progress)
            labelled = selectors.cohort_exam_scores(
                cohort=cohort, classifier=classifier, detector=detector, progress=progress
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        exams = selectors.scored_exams(labelled, source)
        if not exams:
            raise CommandError(
                f"none of the {len(labelled)} labelled exams of cohort {cohort.name!r} could be scored by the {source} "
                "score: no image is assessable, of the model's task, and decodable"
            )

        exam_abnormal = [e.abnormal for e in exams]
        exam_scores = [e.score(source) for e in exams]
        images = [(e, image) for e in exams for image in e.images if _has_image_score(e, source, image)]
        image_abnormal = [image[0].abnormal for _e, image in images]
        if classifier is not None:
            lesion_exams = [e for e in exams if e.malignant in (0, 1) and e.p_malignant is not None]
            lesion_images = [image for _e, image in images if image[0].malignant in (0, 1) and image[2] is not None]
            auc_malignant = metrics.auc([e.malignant for e in lesion_exams], [e.p_malignant for e in lesion_exams])
            image_auc_malignant = metrics.auc([i[0].malignant for i in lesion_images], [i[2] for i in lesion_images])
        else:  # benign vs malignant is the classifier's second output; the detector's classes are lesion types
            auc_malignant = image_auc_malignant = None

        threshold = options["threshold"] if options["threshold"] is not None else DEFAULT_THRESHOLD
        if point is not None:
            threshold = point.threshold
        at = metrics.at_threshold(exam_abnormal, exam_scores, threshold)
        curve = metrics.curve(exam_abnormal, exam_scores)
        result: dict[str, Any] = {
            "score_source": source,
            "auc_abnormal": metrics.auc(exam_abnormal, exam_scores),
            "auc_abnormal_ci95": metrics.auc_interval(exam_abnormal, exam_scores),
            "auc_malignant": auc_malignant,
            "rule_out_at_full_sensitivity": metrics.rule_out_at_full_sensitivity(exam_abnormal, exam_scores),
            "operating_point": {
                "sensitivity": at.sensitivity,
                "specificity": at.specificity,
                "workload_reduction": at.workload_reduction,
                **metrics.counts_at(exam_abnormal, exam_scores, threshold),
                "threshold": threshold,
                "signed_off": point is not None,
                "id": point.pk if point else None,
                "score_source": source,
            },
            # Every score the active models allow, for comparison (the point's is the one above).
            "by_source": {
                other: _source_figures(labelled, other) for other in SOURCES if selectors.scored_exams(labelled, other)
            },
            "breast_level": _breast_level(exams, source, threshold),
            "image_level": {
                "auc_abnormal": metrics.auc(image_abnormal, [e.image_score(source, image) for e, image in images]),
                "auc_malignant": image_auc_malignant,
                "images": len(images),
            },
            "exams": len(exams),
            # Labelled exams triage could not score under this source either (no image
            # assessable and of the model's task): left out of every figure above.
            "left_out_exams": len(labelled) - len(exams),
            "abnormal_exams": sum(exam_abnormal),
            "patients": len({e.study.patient_id for e in exams}),  # Patient rows: PatientID within its issuer
            "classifier": classifier.version.name if classifier else None,
            "detector": detector.version.name if detector else None,
            "froc": None,
            "dice_mean": None,
            "localisation": "",
        }
        out = Path(options["out"])
        out.mkdir(parents=True, exist_ok=True)
        metrics.plot_curves(
            curve, out / "roc_workload.png", title=f"{source} score on {cohort.name} (exam level)", operating_point=at
        )
        result["roc_png"] = str(out / "roc_workload.png")
        result["training_patients"] = services.training_patients(
            [m.version for m in loaded.values() if m is not None], {e.study.patient_id for e in exams}
        )
        result["not_active"] = sorted(
            m.version.name
            for m in loaded.values()
            if m is not None and m.version.status != TriageModelVersion.Status.ACTIVE
        )
        result.update(self._localisation(exams, options["out"], loaded["detector"], loaded["segmenter"]))
        if options["json"]:
            self.stdout.write(json.dumps(result))
            return
        op, breasts = result["operating_point"], result["breast_level"]
        whose = f" (signed-off point {point.pk}'s)" if point else ""
        models = ", ".join(
            f"{kind} {m.version.name}" + (" (not active)" if m.version.name in result["not_active"] else "")
            for kind, m in loaded.items()
            if m is not None and kind in SCORING_KINDS
        )
        others = "; ".join(
            f"{other}: AUC {_fmt(v['auc_abnormal'])}, rule-out {_fmt(v['rule_out_at_full_sensitivity'])}"
            for other, v in result["by_source"].items()
        )
        self.stdout.write(
            f"{cohort.name}: {result['exams']} exams of {result['patients']} patients ({result['abnormal_exams']} "
            f"abnormal), {models}\n"
            + (
                f"left out: {result['left_out_exams']} labelled exams the {source} score cannot score "
                "(not assessable, or no image of the model's task)\n"
                if result["left_out_exams"]
                else ""
            )
            + f"score: {LABELS[source]}{whose}\n"
            f"AUC normal vs abnormal {_fmt(result['auc_abnormal'])}{_interval(result['auc_abnormal_ci95'])} (exam), "
            f"{_fmt(result['image_level']['auc_abnormal'])} (image)\n"
            f"AUC benign vs malignant {_fmt(result['auc_malignant'])} (exam), "
            f"{_fmt(result['image_level']['auc_malignant'])} (image)\n"
            f"normals ruled out at 100 % sensitivity: {_fmt(result['rule_out_at_full_sensitivity'])}\n"
            f"at threshold {threshold:.4f} ({'signed-off point ' + str(point.pk) if point else 'no signed-off point'}):"
            f" sensitivity {_fmt(op['sensitivity'])}{_ci(op['sensitivity_counts'], op['sensitivity_ci95'])}, "
            f"specificity {_fmt(op['specificity'])}{_ci(op['specificity_counts'], op['specificity_ci95'])}, "
            f"workload reduction {op['workload_reduction']:.3f}\n"
            f"breast level: AUC {_fmt(breasts['auc_abnormal'])} ({breasts['breasts']} breasts, "
            f"{breasts['abnormal_breasts']} abnormal); at the threshold sensitivity {_fmt(breasts['sensitivity'])}, "
            f"specificity {_fmt(breasts['specificity'])}\n"
            f"every score (exam AUC, normals ruled out at 100 % sensitivity): {others}\n"
            f"FROC (0.5/1/2 false marks per image): {_froc_text(result['froc'], result.get('lesions'))}"
            + (f" ({result['froc_note']})" if result.get("froc_note") else "")
            + f"; Dice: {_fmt(result['dice_mean'])}"
            + (f" ({result['localisation']})" if result["localisation"] else "")
            + _by_class_line(result.get("froc_by_class"))
        )
        if other_point is not None:
            self.stdout.write(
                f"note: the signed-off point {other_point.pk} thresholds the {other_point.score_source} score, not "
                f"this one: the figures at a threshold are at --threshold {threshold:g}"
            )
        for name, count in result["training_patients"].items():
            self.stdout.write(
                f"warning: {count} of these {result['patients']} patients are in {name}'s training cohort: "
                "these figures are not those of new patients"
            )
        curves = [result[key] for key in ("roc_png", "froc_png") if result.get(key)]
        self.stdout.write(f"curves: {', '.join(curves)}")

    def _localisation(self, exams, out: Path, detector, segmenter) -> dict[str, Any]:
        """FROC and Dice from the localisers' evaluation (the detector and segmenter evaluated)."""
        if detector is None and segmenter is None:
            return {"localisation": "no active detector or segmenter"}
        ids = [image[0].instance.pk for e in exams for image in e.images]
        report = services.evaluate_localisation(
            instances=Instance.objects.filter(pk__in=ids),
            out_dir=Path(out),
            models={"detector": detector, "segmenter": segmenter},
        )
        return {
            "froc": report.get("froc"),
            "froc_by_class": report.get("froc_by_class"),
            "lesions": report.get("lesions"),
            "froc_note": report.get("froc_note", ""),
            "false_marks_per_image": report.get("false_marks_per_image"),
            "dice_mean": report.get("dice_mean"),
            "froc_png": report.get("froc_png"),
        }


def _froc_text(froc: dict[str, float] | None, lesions: int | None) -> str:
    if froc is None:
        return "n/a"
    return f"{froc['0.5']:.2f}/{froc['1']:.2f}/{froc['2']:.2f} ({lesions} lesions)"


def _by_class_line(by_class: dict[str, dict[str, Any]] | None) -> str:
    """The text output's line of per-class FROC figures (sensitivity at 0.5 / 1 / 2 false
    marks per image, and the class's lesions), or nothing without lesion classes."""
    if not by_class:
        return ""
    parts = (f"{label} {_froc_text(v, v['lesions'])}" for label, v in by_class.items())
    return "\nFROC by lesion class: " + "; ".join(parts)


def _has_image_score(exam, source: str, image) -> bool:
    try:
        exam.image_score(source, image)
    except KeyError:
        return False
    return True


def _breast_level(exams, source: str, threshold: float) -> dict[str, Any]:
    """AUC and the operating point's sensitivity/specificity per breast: an exam's images
    grouped by laterality (as classifier.combine groups them; unknown sides together),
    a breast abnormal when one of its images is, scored like an exam of those images
    only (max of each model's evidence). Where every exam is abnormal, as in a set of
    lesion cases with their other breast, this is the figure that can tell them apart."""
    from triage.classifier import breast_side
    from triage.exam_score import exam_score

    labels, scores = [], []
    for exam in exams:
        sides: dict[str, list] = {}
        for image in exam.images:
            sides.setdefault(breast_side(image[0].instance.laterality), []).append(image)
        for images in sides.values():
            classifier = [i[1] for i in images if i[1] is not None]
            detector = [i[3] for i in images if i[3] is not None]
            score = exam_score(
                source,
                p_classifier=max(classifier) if classifier else None,
                p_detector=max(detector) if detector else None,
            )
            if score is not None:
                labels.append(int(any(i[0].abnormal for i in images)))
                scores.append(score)
    at = metrics.at_threshold(labels, scores, threshold) if labels else None
    return {
        "auc_abnormal": metrics.auc(labels, scores) if labels else None,
        "breasts": len(labels),
        "abnormal_breasts": sum(labels),
        "sensitivity": at.sensitivity if at else None,
        "specificity": at.specificity if at else None,
    }


def _source_figures(labelled, source: str) -> dict[str, Any]:
    """Exam AUC and rule-out under one score source, over the exams it can score."""
    exams = selectors.scored_exams(labelled, source)
    abnormal = [e.abnormal for e in exams]
    scores = [e.score(source) for e in exams]
    return {
        "auc_abnormal": metrics.auc(abnormal, scores),
        "rule_out_at_full_sensitivity": metrics.rule_out_at_full_sensitivity(abnormal, scores),
        "exams": len(exams),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(counts: list[int], bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" ({counts[0]}/{counts[1]}, 95 % CI {bounds[0]:.3f}–{bounds[1]:.3f})"


def _interval(bounds: tuple[float, float] | None) -> str:
    return "" if bounds is None else f" [95 % CI {bounds[0]:.3f}–{bounds[1]:.3f}, bootstrap]"
