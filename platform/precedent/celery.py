"""Celery app, used only when CELERY_BROKER_URL is set: `celery -A precedent worker`.

There is one task: it runs a job registered with `precedent.tasks.job`, so Celery and
the in-process worker call the very same service functions.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "precedent.settings.production")

app = Celery("precedent")
app.config_from_object("django.conf:settings", namespace="CELERY")
# Jobs register themselves when their apps load (AppConfig.ready imports the services).


@app.task(name="precedent.run_job", acks_late=True)
def run_job(name: str, kwargs: dict) -> None:
    from precedent.tasks import run_job as run

    run(name, kwargs)
