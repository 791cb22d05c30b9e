"""The Django side of a dataset import: ingest each item, store its findings, fill the cohort.

Converted images go through `services.instance_ingest` like any upload, so they are
validated, deduplicated and stored the same way; a re-import finds them as duplicates
and only refreshes their findings (keyed by `source_key`, so never doubled).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field

from django.db import transaction
from tqdm import tqdm

from studies import services
from studies.models import Finding, Instance, Study
from studies.services import Outcome

from .base import Conversion, FindingSpec


@dataclass
class ImportSummary:
    dataset: str
    cohort: str | None
    images: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)  # reason → images
    findings_created: int = 0
    findings_updated: int = 0
    cohort_studies: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = (
            f"{self.dataset}: {self.images} images: {self.outcomes[Outcome.STORED]} stored, "
            f"{self.outcomes[Outcome.DUPLICATE]} duplicate, {self.outcomes[Outcome.REJECTED]} rejected; "
            f"findings: {self.findings_created} created, {self.findings_updated} updated"
        )
        if self.cohort:
            text += f"; cohort {self.cohort!r}: {self.cohort_studies} studies"
        return text

    def detail_lines(self) -> list[str]:
        """Rejection reasons, most frequent first, then the reader's notes."""
        lines = [f"  rejected {count}×: {reason}" for reason, count in self.rejections.most_common()]
        return lines + [f"  note: {note}" for note in self.notes]


def import_conversion(conversion: Conversion, *, cohort: str | None, progress: bool | None = None) -> ImportSummary:
    """Ingest every item of `conversion`; add the studies that were stored or already
    there to `cohort` (None: no cohort). `progress` None shows a bar on terminals only."""
    summary = ImportSummary(dataset=conversion.dataset, cohort=cohort, notes=list(conversion.notes))
    study_uids: set[str] = set()
    bar = tqdm(
        conversion.items, total=conversion.total, desc=conversion.dataset, unit="img", disable=_disable(progress)
    )
    for item in bar:
        summary.images += 1
        if item.dicom is None:
            summary.outcomes[Outcome.REJECTED] += 1
            summary.rejections[f"{item.name}: {item.problem}"] += 1
            continue
        source = io.BytesIO(item.dicom) if isinstance(item.dicom, bytes) else item.dicom
        result = services.instance_ingest(source=source, name=item.name)
        summary.outcomes[result.outcome] += 1
        if not result.ok:
            summary.rejections[result.reason] += 1
            continue
        created, updated = _store_findings(result.instance, item.findings)
        summary.findings_created += created
        summary.findings_updated += updated
        study_uids.add(result.study_instance_uid)

    if cohort:
        studies = list(Study.objects.filter(study_instance_uid__in=study_uids))
        group = services.cohort_add_studies(name=cohort, studies=studies, description=conversion.description)
        summary.cohort_studies = group.studies.count()
    return summary


@transaction.atomic
def _store_findings(instance: Instance, findings: list[FindingSpec]) -> tuple[int, int]:
    """Upsert the image's findings; returns (created, updated)."""
    created = 0
    for spec in findings:
        x0, y0, x1, y1 = spec.box or (None, None, None, None)
        _, new = services.finding_upsert(
            instance=instance,
            source_key=spec.source_key,
            pathology=spec.pathology,
            abnormality_class=spec.abnormality_class,
            x0=x0,
            y0=y0,
            x1=x1,
            y1=y1,
            source=Finding.Source.DATASET,
            attributes=spec.attributes,
        )
        created += new
    return created, len(findings) - created


def _disable(progress: bool | None) -> bool | None:
    # tqdm: True hides the bar, None hides it when stderr is not a terminal.
    return None if progress is None else not progress
