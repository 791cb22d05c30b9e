"""Reads for exports."""

from __future__ import annotations

from studies.models import Instance

from .models import AiDicomResult


def ai_results_for(*, source: Instance) -> list[AiDicomResult]:
    """The SR/SEG instances stored from this image's model results, newest version first."""
    return list(
        AiDicomResult.objects.filter(source=source)
        .select_related("instance", "model_version")
        .order_by("kind", "-model_version__created_at")
    )
