"""python manage.py evaluate_retrieval --cohort NAME --label L [--level image|region] --k 1 5 10 [--json]."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from embeddings import services  # isort: skip - imports faiss before torch
from embeddings import encoder as enc
from embeddings.metrics import chance_metrics, recall_at_k, retrieval_metrics
from embeddings.models import Embedding, EncoderVersion, SearchFeedback
from embeddings.selectors import LABELS, REGION_LABELS, cohort_images, cohort_regions
from studies.errors import RenderError
from studies.models import Cohort, Instance

# Random-vector draws for the chance level; fewer on large cohorts, where each draw
# ranks every pair of images (N² work) like the real evaluation.
CHANCE_SEEDS, CHANCE_SEEDS_LARGE, CHANCE_LARGE = 50, 5, 2000


class Command(BaseCommand):
    help = (
        "Retrieval quality on a labelled cohort: precision@k and mAP (same-patient hits excluded) for the encoder "
        "and for a raw-pixels baseline, recall@10 of the live index against exact search, and search feedback. "
        "--level region asks the same of the lesion index: each finding box queries the other boxes."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--cohort", required=True)
        parser.add_argument("--label", choices=LABELS, default="abnormal")
        parser.add_argument(
            "--level",
            choices=("image", "region"),
            default="image",
            help="image: whole images query the image index; region: finding boxes query the lesion index "
            f"(labels {', '.join(REGION_LABELS)})",
        )
        parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
        parser.add_argument("--encoder", default="", help="encoder version (default: the active one)")
        parser.add_argument("--no-baseline", action="store_true", help="skip the raw-pixels baseline")
        parser.add_argument(
            "--chance-seeds",
            type=int,
            default=None,
            help="random-vector draws for the chance level (mean, sd, 95 %% range); 0 skips it "
            f"(default {CHANCE_SEEDS}, {CHANCE_SEEDS_LARGE} above {CHANCE_LARGE} images: each draw ranks every pair)",
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    def handle(self, *args: Any, **options: Any) -> None:
        if not Cohort.objects.filter(name=options["cohort"]).exists():
            raise CommandError(f"no cohort named {options['cohort']!r}")
        if any(k < 1 for k in options["k"]):
            raise CommandError("--k values must be positive")
        if options["chance_seeds"] is not None and options["chance_seeds"] < 0:
            raise CommandError("--chance-seeds must be 0 or more")
        region = options["level"] == "region"
        if region and options["label"] not in REGION_LABELS:
            raise CommandError(f"--level region needs --label {' or '.join(REGION_LABELS)} (every region is a lesion)")
        encoder = self._encoder(options["encoder"])
        if region:
            items = cohort_regions(options["cohort"], options["label"])
        else:
            items = [item for item in cohort_images(options["cohort"], options["label"]) if item.label is not None]
        unit = "finding boxes" if region else "images"
        if len(items) < 2:
            raise CommandError(f"cohort {options['cohort']!r} has {len(items)} labelled {unit}; need at least 2")

        instance_ids = {item.instance.pk for item in items}
        services.embed_pending(encoder=encoder, instances=Instance.objects.filter(pk__in=instance_ids))
        if region:
            regions = Embedding.objects.filter(encoder=encoder, kind="region", finding__in=[i.finding for i in items])
            stored = {e.finding_id: e.as_array() for e in regions}
            items = [item for item in items if item.finding.pk in stored]
            vectors = np.stack([stored[item.finding.pk] for item in items])
        else:
            stored = {
                e.instance_id: e.as_array()
                for e in Embedding.objects.filter(encoder=encoder, kind="image", instance__in=instance_ids)
            }
            items = [item for item in items if item.instance.pk in stored]
            vectors = np.stack([stored[item.instance.pk] for item in items])
        labels = [item.label for item in items]
        groups = [item.patient_id for item in items]
        ks = sorted(set(options["k"]))

        result: dict[str, Any] = {
            "cohort": options["cohort"],
            "label": options["label"],
            "level": options["level"],
            "encoder": encoder.name,
            # Queries: images, or finding boxes with --level region.
            "images": len(items),
            "patients": len(set(groups)),
            "label_counts": {str(k): v for k, v in sorted(_counts(labels).items())},
            **_metrics(vectors, labels, groups, ks),
            "recall_at_10_vs_exact": self._index_recall(encoder, vectors, "region" if region else "image"),
            # The bar is on patients the encoder never saw: say when these are not.
            "training_patients": services.training_patients(encoder, set(groups)),
            "encoder_training_cohort": (encoder.metadata or {}).get("cohort") or "",
        }
        if not options["no_baseline"]:
            raw = self._raw_pixel_vectors(items, encoder, quiet=options["json"] or options["verbosity"] == 0)
            result["baseline"] = {"encoder": "raw-pixels", **_metrics(raw, labels, groups, ks)}
        seeds = options["chance_seeds"]
        if seeds is None:
            seeds = CHANCE_SEEDS if len(items) <= CHANCE_LARGE else CHANCE_SEEDS_LARGE
        if seeds:
            result["chance"] = chance_metrics(labels, groups, ks, dim=encoder.dim, seeds=seeds)
        result["feedback"] = _feedback(encoder)

        if options["json"]:
            self.stdout.write(json.dumps(_without_nan(result)))
        else:
            self._table(result, ks)

    def _encoder(self, name: str) -> EncoderVersion:
        if name:
            encoder = EncoderVersion.objects.filter(name=name).first()
            if encoder is None:
                raise CommandError(f"no encoder version named {name!r}")
            return encoder
        encoder = services.active_encoder()
        if encoder is None:
            raise CommandError("no active encoder: train one with train_encoder, or name one with --encoder")
        return encoder

    def _index_recall(self, encoder: EncoderVersion, queries: np.ndarray, kind: str) -> float:
        """The live index's top 10 against exact search over the same vectors."""
        index = services.serving_index(encoder, kind)
        ids, vectors = index.get_vectors(index.ids())
        k = min(10, len(ids))
        _, approx = index.search(queries, k)
        exact = ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]
        return recall_at_k(approx, exact, k)

    def _raw_pixel_vectors(self, items, encoder: EncoderVersion, *, quiet: bool) -> np.ndarray:
        """Downsampled raw pixels, preprocessed exactly as the encoder's input."""
        _, meta = services.loaded_encoder(encoder)
        baseline = enc.build_encoder("raw-pixels", dim=min(encoder.dim, 1024), preprocessing=meta.preprocessing)
        tensors = []
        picture, decoded = None, None  # the last image decoded: its other finding boxes follow it
        for item in tqdm(items, desc="raw-pixels baseline", unit="img", disable=quiet):
            instance = item.instance
            if decoded != instance.pk:
                try:
                    picture = services.instance_picture(instance, services.representative_frame(instance))
                except RenderError as exc:
                    raise CommandError(f"{instance.sop_instance_uid}: {exc}") from None
                decoded = instance.pk
            tensors.append(
                enc.preprocess(picture.pixels, meta.preprocessing, item.box, monochrome1=picture.monochrome1)
            )
        return enc.embed_batch(baseline, tensors, "cpu")

    def _table(self, result: dict[str, Any], ks: list[int]) -> None:
        unit = "finding boxes (lesion index)" if result["level"] == "region" else "images"
        self.stdout.write(
            f"cohort {result['cohort']}: {result['images']} labelled {unit} of {result['patients']} patients; "
            f"label {result['label']}: {result['label_counts']}"
        )
        header = "encoder".ljust(40) + "".join(f"P@{k}".rjust(8) for k in ks) + "mAP".rjust(8)
        self.stdout.write(header)
        rows = [(result["encoder"], result)] + (
            [("raw-pixels baseline", result["baseline"])] if "baseline" in result else []
        )
        for name, figures in rows:
            cells = "".join(f"{figures['precision_at'][k]:8.3f}" for k in ks)
            self.stdout.write(name.ljust(40) + cells + f"{figures['map']:8.3f}")
        if "chance" in result:
            chance = result["chance"]
            for name, key in ((f"chance: random vectors ({chance['seeds']} draws)", "mean"), ("  ± sd", "sd")):
                cells = "".join(f"{chance['precision_at'][k][key]:8.3f}" for k in ks)
                self.stdout.write(name.ljust(40) + cells + f"{chance['map'][key]:8.3f}")
        self.stdout.write(f"recall@10 of the live index against exact search: {result['recall_at_10_vs_exact']:.3f}")
        if result["training_patients"]:
            self.stdout.write(
                f"warning: {result['training_patients']} of these {result['patients']} patients are in "
                f"{result['encoder']}'s training cohort {result['encoder_training_cohort']!r}: "
                "these figures are not those of new patients"
            )
        fb = result["feedback"]
        if fb["count"]:
            self.stdout.write(f"search feedback: {fb['count']} verdicts, {fb['relevant_share']:.0%} relevant")


def _metrics(vectors: np.ndarray, labels, groups, ks) -> dict[str, Any]:
    figures = retrieval_metrics(vectors, labels, groups, ks)
    return {"precision_at": figures["precision_at"], "map": figures["map"], "queries": figures["queries"]}


def _counts(labels) -> dict[str, int]:
    out: dict[str, int] = {}
    for label in labels:
        out[label] = out.get(label, 0) + 1
    return out


def _feedback(encoder: EncoderVersion) -> dict[str, Any]:
    """Radiologists' verdicts on this encoder's results; a changed mind counts once,
    with its latest verdict."""
    latest = (
        SearchFeedback.objects.filter(encoder=encoder)
        .order_by("user_id", "query_instance_id", "query_box", "result_instance_id", "result_box", "-created_at")
        .distinct("user_id", "query_instance_id", "query_box", "result_instance_id", "result_box")
    )
    verdicts = [(f.rank, f.relevant) for f in latest]
    relevant = sum(r for _, r in verdicts)
    top5 = [r for rank, r in verdicts if rank <= 5]
    return {
        "count": len(verdicts),
        "relevant_share": relevant / len(verdicts) if verdicts else None,
        "relevant_at_5": sum(top5),
        "judged_at_5": len(top5),
    }


def _without_nan(value: Any) -> Any:
    """JSON has no NaN (a metric with no qualifying query): write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nan(v) for v in value]
    return value
