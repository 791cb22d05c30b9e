"""Cross-validated MIAS run of the triage models and the search embedding, for a GPU.

    python bench/gpu_mias.py --data ../shared/datasets/mini-mias --json mias.json --out plots/
    python bench/gpu_mias.py --data ... --device cpu --folds 2 --minutes 0.05 --input-size 128   # the test

The question it answers: with a GPU's compute (full mini-MIAS resolution, hundreds of
epochs instead of six), do the triage models and a supervised search embedding come
near the bars of the issues (exam AUC >= 0.85, >= 50 % of normals ruled out at 100 %
sensitivity, detection sensitivity >= 0.8 at <= 1 false mark per image, search P@5 >=
0.8 for abnormal vs normal)?

It reads the mini-MIAS folder as shipped (images.csv, annotations.csv, the PNG films)
and needs only torch, torchvision, numpy, pillow, tqdm and matplotlib: no Django, no
database. The models are the platform's own pure cores, trained by the same functions
`manage.py train_triage` calls (triage.training, triage.detection,
triage.segmentation), and scored with the same metrics `evaluate_triage` and
`evaluate_retrieval` print (triage.metrics, triage.localisation_metrics,
embeddings.metrics). The films are read here as the MIAS importer stores them: the same
pixels, the same lesion boxes (clipped to the film) and circles.

Patient-level k-fold cross-validation: every patient is held out exactly once, so the
pooled out-of-fold scores cover every exam of the set instead of one split of a few
dozen, and the spread between folds is printed beside the pooled figure. Each fold's
classifier, detector and segmenter train in their own process, all sharing the one
GPU, under one wall-time budget (`--minutes`; the learning-rate schedule shortens to
fit, loop.fit).

What is reported (one JSON object, and ROC and FROC plots):
- classifier: exam AUC abnormal vs normal (max over an exam's films, as triage
  combines them) with a bootstrap interval, AUC benign vs malignant among abnormal
  exams, the share of normal exams ruled out at 100 % sensitivity;
- detector: FROC sensitivity at 0.5 / 1 / 2 false marks per image (hit: IoU >= 0.1 or
  the box centre inside the lesion), per lesion class too, and the exam AUC and rule-out
  of its best-box score and of the fused (noisy-OR) score;
- segmenter: mean lesion Dice against the MIAS circles, breast Dice against the weak
  breast masks;
- search: P@1 / P@5 / P@10 and mAP for abnormal vs normal, same patient excluded,
  within each held-out fold, for the classifier trunk's max-pooled features (a
  supervised embedding), for downsampled raw pixels, and for chance (random vectors).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from embeddings import metrics as retrieval  # noqa: E402
from triage import classifier, detection, metrics, segmentation, training  # noqa: E402
from triage import exam_score as exam_scores  # noqa: E402
from triage import localisation_metrics as loc  # noqa: E402

TASKS = ("classifier", "detector", "segmenter")
FROC_RATES = ("0.5", "1", "2")


@dataclass
class Film:
    refnum: str
    patient: str
    laterality: str
    pixels: np.ndarray  # uint8, rows × columns, as in the PNG
    abnormal: int
    malignant: int  # 1, 0 or training.UNKNOWN
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # clipped to the film
    circles: list[tuple[float, float, float, float]] = field(default_factory=list)  # unclipped squares
    classes: list[str] = field(default_factory=list)  # one per box
    located: bool = True  # False: an abnormal film with a lesion of unknown place


def load_films(data: Path, patients: int = 0) -> list[Film]:
    """The mini-MIAS films with their labels and lesion boxes, in refnum order (those of
    the first `patients` patients only, when given: for smoke runs)."""
    from PIL import Image

    data = Path(data)
    for name in ("images.csv", "annotations.csv"):
        if not (data / name).is_file():
            raise SystemExit(f"error: {data / name} not found (give --data the mini-MIAS folder)")
    with open(data / "annotations.csv", newline="") as handle:
        annotations: dict[str, list[dict[str, str]]] = {}
        for row in csv.DictReader(handle):
            annotations.setdefault(row["refnum"], []).append(row)
    films = []
    with open(data / "images.csv", newline="") as handle:
        kept: set[str] = set()
        for row in csv.DictReader(handle):
            if patients and row["patient_id"] not in kept:
                if len(kept) == patients:
                    continue
                kept.add(row["patient_id"])
            pixels = np.asarray(Image.open(data / row["file"]).convert("L"))
            rows, cols = pixels.shape
            film = Film(
                refnum=row["refnum"],
                patient=row["patient_id"],
                laterality=row["laterality"],
                pixels=pixels,
                abnormal=int(row["label"] == "abnormal"),
                malignant={"M": 1, "B": 0}.get(row["max_severity"], training.UNKNOWN),
            )
            for ann in annotations.get(row["refnum"], []):
                if ann["abnormality_class"] == "NORM":
                    continue
                if not ann["bbox_x0"]:
                    film.located = False
                    continue
                square = tuple(float(ann[c]) for c in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"))
                film.circles.append(square)
                film.boxes.append(
                    (max(0.0, square[0]), max(0.0, square[1]), min(float(cols), square[2]), min(float(rows), square[3]))
                )
                film.classes.append(ann["abnormality_class"])
            films.append(film)
    if not films:
        raise SystemExit(f"error: no films listed in {data / 'images.csv'}")
    return films


def patient_folds(films: list[Film], folds: int, seed: int) -> dict[str, int]:
    """Patient → fold, stratified: patients with an abnormal film and those without are
    dealt round-robin into the folds after a seeded shuffle."""
    abnormal = sorted({f.patient for f in films if f.abnormal})
    normal = sorted({f.patient for f in films} - set(abnormal))
    rng = random.Random(seed)
    rng.shuffle(abnormal)
    rng.shuffle(normal)
    return {patient: n % folds for n, patient in enumerate(abnormal + normal)}


# --- one task of one fold, in its own process -------------------------------------------------


def _trunk_features(model: classifier.MammoClassifier, films: list[Film], device: torch.device) -> np.ndarray:
    """The classifier trunk's feature map, max-pooled: one vector per film."""
    prep = model.preprocessing
    b = model.backbone
    out = []
    model.to(device).eval()
    with torch.no_grad():
        for film in films:
            x = classifier.normalise(classifier.prepare_film(film.pixels, prep)[0], prep)[None].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
                x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
            out.append(x.float().amax(dim=(2, 3))[0].cpu().numpy())
    return np.stack(out)


def _classifier(train: list[Film], test: list[Film], args: argparse.Namespace, device: torch.device) -> dict:
    items = [
        training.TrainingItem(f.pixels, f.abnormal, f.malignant, list(f.boxes), False, f.refnum)
        for f in train
        if f.located or not f.abnormal  # an abnormal film without a box has no patch to show
    ]
    config = training.ClassifierConfig(
        architecture=args.classifier_arch,
        input_size=args.input_size,
        patch_size=args.patch_size,
        epochs=args.epochs,
        batch_size=args.classifier_batch,
        seed=args.seed,
        max_seconds=args.minutes * 60,
    )
    model, report = training.train_classifier(items, config, device=device, progress=False)
    scores = classifier.score_images(model, [f.pixels for f in test], device=device)
    features = _trunk_features(model, test, device)
    return {
        "training": {
            "epochs": len(report.epoch_losses),
            "steps": report.steps,
            "seconds": round(report.seconds, 1),
            "films_per_second": round(report.images_per_second, 1),
            "loss_first_last": [round(report.epoch_losses[0], 4), round(report.epoch_losses[-1], 4)],
        },
        "scores": {f.refnum: [float(s[0]), float(s[1])] for f, s in zip(test, scores, strict=True)},
        "features": {f.refnum: v.tolist() for f, v in zip(test, features, strict=True)},
    }


def _loop_summary(report: detection.TrainReport | segmentation.TrainReport) -> dict:
    return {"epochs": len(report.epoch_losses), "steps": report.steps, "seconds": round(report.seconds, 1)}


def _detector(train: list[Film], test: list[Film], args: argparse.Namespace, device: torch.device) -> dict:
    located = [f for f in train if f.located]
    classes = sorted({c for f in located for c in f.classes})
    index = {c: n for n, c in enumerate(classes)}
    samples = [detection.Sample(f.pixels, list(f.boxes), [index[c] for c in f.classes]) for f in located]
    model, report = detection.train(
        samples,
        classes,
        arch=args.detector_arch,
        input_size=args.input_size,
        crop=args.detector_crop,
        batch_size=args.detector_batch,
        epochs=args.epochs,
        max_seconds=args.minutes * 60,
        seed=args.seed,
        device=device,
        progress=False,
    )
    meta = detection.make_meta(classes, detection.model_config(report))
    model = model.to(device)
    boxes = {}
    for f in test:
        found = detection.detect(model, meta, f.pixels, device=device)
        boxes[f.refnum] = [[b.score, b.x0, b.y0, b.x1, b.y1] for b in found]
    return {
        "training": _loop_summary(report),
        "boxes": boxes,
    }


def _segmenter(train: list[Film], test: list[Film], args: argparse.Namespace, device: torch.device) -> dict:
    samples = []
    for f in train:
        masks = {"breast": segmentation.breast_mask(f.pixels)}
        if f.located:
            masks["lesion"] = segmentation.ellipse_mask(f.pixels.shape, f.circles)
        samples.append(segmentation.Sample(f.pixels, masks))
    model, report = segmentation.train(
        samples,
        input_size=args.segmenter_size,
        crop=args.segmenter_crop,
        batch_size=args.segmenter_batch,
        epochs=args.epochs,
        max_seconds=args.minutes * 60,
        seed=args.seed,
        device=device,
        progress=False,
    )
    meta = segmentation.make_meta(segmentation.LABELS, segmentation.model_config(report))
    model = model.to(device)
    lesion, breast = {}, {}
    for f in test:
        predicted = segmentation.predict(model, meta, f.pixels, device=device)
        breast[f.refnum] = loc.dice(predicted["breast"], segmentation.breast_mask(f.pixels))
        if f.located and f.boxes:
            lesion[f.refnum] = loc.dice(predicted["lesion"], segmentation.ellipse_mask(f.pixels.shape, f.circles))
    return {
        "training": _loop_summary(report),
        "lesion_dice": lesion,
        "breast_dice": breast,
    }


def member_seed(seed: int, member: int) -> int:
    """The training seed of one member of an ensemble. Member 0 trains with --seed
    itself, so a run without --members is the run it always was; the folds always
    come from --seed, so every member holds out the same patients."""
    return seed + 1000 * member


def run_task(job: tuple[str, int, int, argparse.Namespace]) -> dict:
    """Train and score one task of one fold (one ensemble member); an error comes back
    as the result (with its traceback), so one failed training does not lose the
    others' figures."""
    task, fold, member, args = job
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    try:
        device = torch.device(args.device)
        films = load_films(args.data, args.patients)
        assignment = patient_folds(films, args.folds, args.seed)
        train = [f for f in films if assignment[f.patient] != fold]
        test = [f for f in films if assignment[f.patient] == fold]
        member_args = argparse.Namespace(**{**vars(args), "seed": member_seed(args.seed, member)})
        result = {"classifier": _classifier, "detector": _detector, "segmenter": _segmenter}[task](
            train, test, member_args, device
        )
    except Exception:
        result = {"error": traceback.format_exc(limit=8)}
    result.update(task=task, fold=fold, member=member, wall_seconds=round(time.perf_counter() - started, 1))
    return result


# --- combining the members of an ensemble -------------------------------------------------------


def fuse_boxes(members: list[list[list[float]]], min_iou: float = 0.5) -> list[list[float]]:
    """Weighted box fusion (Solovyev et al. 2021) of several detectors' boxes on one
    image, each box [score, x0, y0, x1, y1]. Boxes are taken best first; each joins the
    first cluster whose fused box it overlaps by at least `min_iou`, else starts one. A
    cluster's box is the score-weighted mean of its boxes, and its score the sum of each
    member's best score in it divided by the number of members: a lesion all members
    find keeps its score, a mark only one member makes is discounted."""
    n = len(members)
    if n == 0:
        return []
    ranked = sorted(((box[0], m, box[1:]) for m, boxes in enumerate(members) for box in boxes), key=lambda t: -t[0])
    clusters: list[dict] = []
    for score, member, coords in ranked:
        for cluster in clusters:
            if loc.iou(tuple(cluster["box"]), tuple(coords)) >= min_iou:
                break
        else:
            cluster = {"parts": [], "box": list(coords)}
            clusters.append(cluster)
        cluster["parts"].append((score, member, coords))
        weight = sum(s for s, _, _ in cluster["parts"])
        cluster["box"] = [sum(s * c[i] for s, _, c in cluster["parts"]) / weight for i in range(4)]
    fused = []
    for cluster in clusters:
        best: dict[int, float] = {}
        for score, member, _ in cluster["parts"]:
            best[member] = max(best.get(member, 0.0), score)
        fused.append([sum(best.values()) / n, *cluster["box"]])
    return sorted(fused, key=lambda b: -b[0])


def combine_members(results: list[dict]) -> list[dict]:
    """One result per task and fold from its members' results: classifier scores
    averaged, detector boxes fused, Dice averaged; the trunk features are member 0's."""
    grouped: dict[tuple[str, int], list[dict]] = {}
    for result in sorted(results, key=lambda r: r.get("member", 0)):
        grouped.setdefault((result["task"], result["fold"]), []).append(result)
    combined = []
    for (task, fold), parts in grouped.items():
        merged: dict[str, Any] = {"task": task, "fold": fold, "training": parts[0]["training"]}
        if task == "classifier":
            merged["scores"] = {
                k: [float(np.mean([p["scores"][k][i] for p in parts])) for i in (0, 1)] for k in parts[0]["scores"]
            }
            merged["features"] = parts[0]["features"]
        elif task == "detector":
            merged["boxes"] = {k: fuse_boxes([p["boxes"][k] for p in parts]) for k in parts[0]["boxes"]}
        else:
            for key in ("lesion_dice", "breast_dice"):
                merged[key] = {k: float(np.mean([p[key][k] for p in parts])) for k in parts[0][key]}
        combined.append(merged)
    return combined


# --- pooling the folds ------------------------------------------------------------------------


def _exams(films: list[Film], image_score: dict[str, float]) -> tuple[list[int], list[float], list[str]]:
    """Per patient: abnormal label, max score over its films (triage's combination)."""
    labels: dict[str, int] = {}
    scores: dict[str, float] = {}
    for f in films:
        if f.refnum not in image_score:
            continue
        labels[f.patient] = max(labels.get(f.patient, 0), f.abnormal)
        scores[f.patient] = max(scores.get(f.patient, 0.0), image_score[f.refnum])
    patients = sorted(labels)
    return [labels[p] for p in patients], [scores[p] for p in patients], patients


def _score_report(films: list[Film], image_score: dict[str, float], fold_of: dict[str, int], folds: int) -> dict:
    labels, scores, patients = _exams(films, image_score)
    pooled_auc = metrics.auc(labels, scores)
    per_fold = []
    for fold in range(folds):
        chosen = [n for n, p in enumerate(patients) if fold_of[p] == fold]
        fold_auc = metrics.auc([labels[n] for n in chosen], [scores[n] for n in chosen])
        rule_out = metrics.rule_out_at_full_sensitivity([labels[n] for n in chosen], [scores[n] for n in chosen])
        per_fold.append({"auc": fold_auc, "rule_out_at_full_sensitivity": rule_out})
    aucs = [p["auc"] for p in per_fold if p["auc"] is not None]
    rule_outs = [p["rule_out_at_full_sensitivity"] for p in per_fold if p["rule_out_at_full_sensitivity"] is not None]
    return {
        "exams": len(labels),
        "abnormal_exams": sum(labels),
        "auc": pooled_auc,
        "auc_interval": metrics.auc_interval(labels, scores),
        "rule_out_at_full_sensitivity": metrics.rule_out_at_full_sensitivity(labels, scores),
        "per_fold": per_fold,
        "auc_fold_mean_sd": [float(np.mean(aucs)), float(np.std(aucs))] if aucs else None,
        "rule_out_fold_mean": float(np.mean(rule_outs)) if rule_outs else None,
        "curve": metrics.curve(labels, scores),
    }


def _malignant_auc(films: list[Film], p_malignant: dict[str, float]) -> dict:
    """Benign vs malignant among abnormal exams of known pathology."""
    by_patient: dict[str, list[Film]] = {}
    for f in films:
        if f.refnum in p_malignant:
            by_patient.setdefault(f.patient, []).append(f)
    labels, scores = [], []
    for patient_films in by_patient.values():
        known = [f.malignant for f in patient_films if f.abnormal and f.malignant != training.UNKNOWN]
        if not known:
            continue
        labels.append(max(known))
        scores.append(max(p_malignant[f.refnum] for f in patient_films))
    return {"exams": len(labels), "malignant_exams": sum(labels), "auc": metrics.auc(labels, scores)}


def _froc(films: list[Film], boxes: dict[str, list[list[float]]]) -> dict:
    cases = [
        loc.ImageCase([(b[0], tuple(b[1:])) for b in boxes[f.refnum]], list(f.boxes), list(f.classes))
        for f in films
        if f.refnum in boxes and f.located
    ]
    curve = loc.froc(cases)
    by_class = loc.froc_by_class(cases)
    return {
        "images": len(cases),
        "lesions": curve.lesions,
        "sensitivity_at": {rate: loc.sensitivity_at(curve, float(rate)) for rate in FROC_RATES},
        "by_class": {
            label: {"lesions": part.lesions, **{r: loc.sensitivity_at(part, float(r)) for r in FROC_RATES}}
            for label, part in by_class.items()
        },
        "false_marks_per_image": curve.false_marks_per_image[-1] if curve.false_marks_per_image else 0.0,
        "_curve": curve,
        "_by_class": by_class,
    }


def _retrieval(films: list[Film], vectors: dict[str, np.ndarray], fold_of: dict[str, int], folds: int) -> dict:
    """P@k and mAP for abnormal vs normal within each held-out fold (same patient
    excluded), averaged over the folds weighted by their queries."""
    parts = []
    for fold in range(folds):
        chosen = [f for f in films if fold_of[f.patient] == fold and f.refnum in vectors]
        if len(chosen) < 2:
            continue
        result = retrieval.retrieval_metrics(
            np.stack([vectors[f.refnum] for f in chosen]),
            [f.abnormal for f in chosen],
            [f.patient for f in chosen],
            ks=(1, 5, 10),
        )
        parts.append(result)
    return _weighted(parts)


def _weighted(parts: list[dict]) -> dict:
    queries = sum(p["queries"] for p in parts)
    if not queries:
        return {"precision_at": {}, "map": None, "queries": 0}
    ks = parts[0]["precision_at"].keys()
    return {
        "precision_at": {str(k): float(sum(p["precision_at"][k] * p["queries"] for p in parts) / queries) for k in ks},
        "map": float(sum(p["map"] * p["queries"] for p in parts) / queries),
        "queries": queries,
    }


def _chance(films: list[Film], fold_of: dict[str, int], folds: int, seeds: int) -> dict:
    parts, queries = [], []
    for fold in range(folds):
        chosen = [f for f in films if fold_of[f.patient] == fold]
        if len(chosen) >= 2:
            parts.append(
                retrieval.chance_metrics(
                    [f.abnormal for f in chosen], [f.patient for f in chosen], ks=(1, 5, 10), seeds=seeds
                )
            )
            queries.append(len(chosen))  # every film queries (each fold has both labels)
    total = sum(queries)
    return {
        "precision_at": {
            str(k): float(sum(p["precision_at"][k]["mean"] * q for p, q in zip(parts, queries, strict=True)) / total)
            for k in (1, 5, 10)
        },
        "map": float(sum(p["map"]["mean"] * q for p, q in zip(parts, queries, strict=True)) / total),
    }


def _raw_pixels(film: Film, side: int = 32) -> np.ndarray:
    tensor = torch.from_numpy(film.pixels.astype(np.float32) / 255.0)[None, None]
    small = F.interpolate(tensor, size=(side, side), mode="area")[0, 0].flatten().numpy()
    return small - small.mean()


def summarise(films: list[Film], results: list[dict], args: argparse.Namespace, out: Path | None) -> dict:
    """The report. With several members, each member is scored on its own first
    (`members`), and the figures above them are the ensemble's."""
    errors = [{k: r[k] for k in ("task", "fold", "member", "error") if k in r} for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    members = sorted({r.get("member", 0) for r in results})
    if len(members) <= 1:
        return _summarise(films, results, errors, args, out)
    per_member = []
    for member in members:
        alone = _summarise(films, [r for r in results if r.get("member", 0) == member], [], args, None)
        per_member.append(
            {
                "member": member,
                "seed": member_seed(args.seed, member),
                "classifier_auc": alone.get("classifier", {}).get("auc"),
                "classifier_rule_out": alone.get("classifier", {}).get("rule_out_at_full_sensitivity"),
                "detector_froc": alone.get("detector", {}).get("froc", {}).get("sensitivity_at"),
                "detector_auc": alone.get("detector", {}).get("exam", {}).get("auc"),
                "fused_auc": alone.get("fused", {}).get("auc"),
            }
        )
    report = _summarise(films, combine_members(results), errors, args, out)
    report["training"] = {
        task: [{"member": r.get("member", 0), "fold": r["fold"], **r["training"]} for r in results if r["task"] == task]
        for task in TASKS
    }
    report["members"] = per_member
    return report


def _asymmetry(films: list[Film], image_score: dict[str, float]) -> dict[str, float]:
    """Each film's score minus its contralateral film's (floored at 0): an exam's max of
    these is the gap between its two breasts. Exploratory: a lesion is usually in one
    breast, while density and film quality, which also move a score, are shared."""
    by_patient: dict[str, list[Film]] = {}
    for f in films:
        if f.refnum in image_score:
            by_patient.setdefault(f.patient, []).append(f)
    out = {}
    for group in by_patient.values():
        for f in group:
            others = [image_score[g.refnum] for g in group if g.refnum != f.refnum]
            out[f.refnum] = max(0.0, image_score[f.refnum] - max(others)) if others else image_score[f.refnum]
    return out


def _summarise(
    films: list[Film], results: list[dict], errors: list[dict], args: argparse.Namespace, out: Path | None
) -> dict:
    fold_of = patient_folds(films, args.folds, args.seed)
    by_task: dict[str, dict[str, Any]] = {task: {} for task in TASKS}
    training_runs: dict[str, list[dict]] = {task: [] for task in TASKS}
    for result in results:
        training_runs[result["task"]].append({"fold": result["fold"], **result["training"]})
        for key, value in result.items():
            if isinstance(value, dict) and key != "training":
                by_task[result["task"]].setdefault(key, {}).update(value)
    report: dict[str, Any] = {
        "films": len(films),
        "patients": len(fold_of),
        "abnormal_films": sum(f.abnormal for f in films),
        "folds": args.folds,
        "training": training_runs,
        "errors": errors,
    }
    curves = {}
    cls = by_task["classifier"]
    if cls.get("scores"):
        p_abnormal = {k: v[0] for k, v in cls["scores"].items()}
        exam = _score_report(films, p_abnormal, fold_of, args.folds)
        curves["classifier"] = exam.pop("curve")
        report["classifier"] = {**exam, "malignant": _malignant_auc(films, {k: v[1] for k, v in cls["scores"].items()})}
        asymmetry = _score_report(films, _asymmetry(films, p_abnormal), fold_of, args.folds)
        asymmetry.pop("curve")
        report["classifier_asymmetry"] = asymmetry
        vectors = {k: np.asarray(v, dtype=np.float32) for k, v in cls["features"].items()}
        report["retrieval"] = {
            "classifier_trunk": _retrieval(films, vectors, fold_of, args.folds),
            "raw_pixels_32": _retrieval(films, {f.refnum: _raw_pixels(f) for f in films}, fold_of, args.folds),
            "chance": _chance(films, fold_of, args.folds, args.chance_seeds),
        }
    det = by_task["detector"]
    froc = None
    if det.get("boxes"):
        froc = _froc(films, det["boxes"])
        best = {k: exam_scores.detector_score(b[0] for b in v) for k, v in det["boxes"].items()}
        exam = _score_report(films, best, fold_of, args.folds)
        curves["detector"] = exam.pop("curve")
        report["detector"] = {"froc": {k: v for k, v in froc.items() if not k.startswith("_")}, "exam": exam}
        if cls.get("scores"):
            fused = {k: exam_scores.fuse(cls["scores"][k][0], best[k]) for k in best if k in cls["scores"]}
            exam = _score_report(films, fused, fold_of, args.folds)
            curves["fused"] = exam.pop("curve")
            report["fused"] = exam
    seg = by_task["segmenter"]
    if seg.get("breast_dice"):
        lesion = list(seg.get("lesion_dice", {}).values())
        report["segmenter"] = {
            "lesion_dice_mean": float(np.mean(lesion)) if lesion else None,
            "lesion_images": len(lesion),
            "breast_dice_mean": float(np.mean(list(seg["breast_dice"].values()))),
        }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, points in curves.items():
            metrics.plot_curves(points, out / f"roc_{name}.png", title=f"{name}, exams pooled over {args.folds} folds")
        if froc is not None:
            loc.plot_froc(froc["_curve"], out / "froc.png", title="FROC, pooled folds", by_class=froc["_by_class"])
    return report


def _table(report: dict) -> str:
    def f(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    def span(values: Any) -> str:
        return "[" + "–".join(f(v) for v in values) + "]" if values else "n/a"

    lines = [f"{report['films']} films, {report['patients']} patients, {report['folds']}-fold patient-level CV"]
    for name in ("classifier", "classifier_asymmetry", "fused"):
        if name in report:
            r = report[name]
            mean, sd = r["auc_fold_mean_sd"] or (None, None)
            lines.append(
                f"{name:<20} exam AUC {f(r['auc'])} {span(r['auc_interval'])}, folds mean {f(mean)} sd {f(sd)}, "
                f"normals ruled out at 100% sensitivity {f(r['rule_out_at_full_sensitivity'])} "
                f"(fold mean {f(r['rule_out_fold_mean'])})"
            )
    if "classifier" in report:
        lines.append(f"classifier AUC benign vs malignant {f(report['classifier']['malignant']['auc'])}")
    if "detector" in report:
        d = report["detector"]
        lines.append(
            f"detector   FROC {' / '.join(f(d['froc']['sensitivity_at'][r]) for r in FROC_RATES)} "
            f"({d['froc']['lesions']} lesions); exam AUC {f(d['exam']['auc'])}, "
            f"rule-out {f(d['exam']['rule_out_at_full_sensitivity'])}"
        )
    if "segmenter" in report:
        s = report["segmenter"]
        lines.append(f"segmenter  lesion Dice {f(s['lesion_dice_mean'])}, breast Dice {f(s['breast_dice_mean'])}")
    for name, r in report.get("retrieval", {}).items():
        p = r["precision_at"]
        lines.append(
            f"search     {name:<17} P@1 {f(p.get('1'))} P@5 {f(p.get('5'))} P@10 {f(p.get('10'))} mAP {f(r['map'])}"
        )
    for m in report.get("members", []):
        froc = m["detector_froc"]
        lines.append(
            f"member {m['member']} (seed {m['seed']}): classifier AUC {f(m['classifier_auc'])}, rule-out "
            f"{f(m['classifier_rule_out'])}; detector FROC "
            f"{' / '.join(f(froc[r]) for r in FROC_RATES) if froc else 'n/a'}, exam AUC {f(m['detector_auc'])}; "
            f"fused AUC {f(m['fused_auc'])}"
        )
    if report.get("members"):
        lines.append(f"the figures above the member lines are the {len(report['members'])}-member ensemble's")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the mini-MIAS folder (images.csv, annotations.csv)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patients", type=int, default=0, help="the first N patients only (smoke runs)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--minutes", type=float, default=4.0, help="training wall time of every model")
    parser.add_argument("--epochs", type=int, default=1000, help="an upper bound; --minutes usually ends training")
    parser.add_argument("--input-size", type=int, default=1024, help="classifier and detector input (MIAS: 1024)")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--classifier-arch", default="resnet18")
    parser.add_argument("--classifier-batch", type=int, default=32)
    parser.add_argument("--detector-arch", default=detection.DEFAULT_ARCH)
    parser.add_argument("--detector-crop", type=int, default=512)
    parser.add_argument("--detector-batch", type=int, default=8)
    parser.add_argument("--segmenter-size", type=int, default=512)
    parser.add_argument("--segmenter-crop", type=int, default=256)
    parser.add_argument("--segmenter-batch", type=int, default=16)
    parser.add_argument(
        "--members",
        type=int,
        default=1,
        help="models per task and fold, each from its own seed: classifier scores averaged, detector boxes fused",
    )
    parser.add_argument("--chance-seeds", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--processes", type=int, default=0, help="default: one per task and fold")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for the ROC and FROC plots")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error("--folds must be at least 2")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.members < 1:
        parser.error("--members must be at least 1")
    films = load_films(args.data, args.patients)
    jobs = [
        (task, fold, member, args)
        for member in range(args.members)
        for task in args.tasks
        for fold in range(args.folds)
    ]
    processes = args.processes or len(jobs)
    started = time.perf_counter()
    print(
        f"{len(jobs)} trainings ({', '.join(args.tasks)} × {args.folds} folds × {args.members} member(s))"
        f" in {processes} processes on {args.device}"
    )
    if processes == 1:
        results = [run_task(job) for job in jobs]
    else:
        with mp.get_context("spawn").Pool(processes) as pool:
            results = []
            for result in pool.imap_unordered(run_task, jobs):
                state = "FAILED" if "error" in result else "done"
                print(
                    f"  {result['task']} fold {result['fold']} member {result['member']} {state}"
                    f" in {result['wall_seconds']} s",
                    flush=True,
                )
                if "error" in result:
                    print(result["error"], flush=True)
                results.append(result)
    report = summarise(films, results, args, args.out)
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    report["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report["environment"] = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "cpus": os.cpu_count(),
    }
    print(_table(report))
    if report["errors"]:
        print(f"{len(report['errors'])} training(s) failed; their folds are missing from the figures above")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=_jsonable))
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    raise TypeError(f"not JSON: {type(value)}")


if __name__ == "__main__":
    main()
