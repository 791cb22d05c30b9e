"""Template tags the study and viewer pages use to show export controls."""

from __future__ import annotations

from django import template

from studies.models import Instance

register = template.Library()


@register.inclusion_tag("exports/_ai_results.html", takes_context=True)
def ai_results(context, instance: Instance) -> dict:
    """Download links for the SR/SEG stored from this image's model results, and a
    button to store them when results exist that are not stored yet."""
    from triage.models import Detection, SegmentationMask

    from .. import selectors

    stored = selectors.ai_results_for(source=instance)
    stored_keys = {(r.model_version_id, r.kind) for r in stored}
    pending = set()
    for kind, model in (("sr", Detection), ("seg", SegmentationMask)):
        latest = (
            model.objects.filter(instance=instance)
            .order_by("-model_version__created_at", "-model_version_id")
            .values_list("model_version_id", flat=True)
            .first()
        )
        if latest is not None:
            pending.add((latest, kind))
    return {
        "ai_results": stored,
        "can_store": bool(pending - stored_keys),
        "instance": instance,
        "csrf_token": context.get("csrf_token"),
    }
