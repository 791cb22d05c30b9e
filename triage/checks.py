"""Fail fast on bad triage settings: `manage.py check` and every server start report
them, instead of the first study to arrive failing its triage job."""

from __future__ import annotations

from django.core.checks import Error, register
from django.core.exceptions import ImproperlyConfigured


@register()
def triage_settings(app_configs, **kwargs) -> list[Error]:
    from . import services

    errors = []
    readers = {
        "triage.E001": services.urgent_rules,
        "triage.E002": services.qa_fraction,
        "triage.E003": services.triage_tasks,
    }
    for error_id, read in readers.items():
        try:
            read()
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), id=error_id))
    return errors
