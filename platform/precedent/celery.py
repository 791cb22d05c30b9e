"""Celery app, used only when CELERY_BROKER_URL is set: `celery -A precedent worker`.

Two tasks: one runs a job registered with `precedent.tasks.job`, so Celery and the
in-process worker call the very same service functions; the other runs such a job
once the equal jobs that joined it have settled (precedent.tasks.run_waiting_job).
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


@app.task(name="precedent.run_waiting_job", acks_late=True)
def run_waiting_job(job_id: int) -> str:
    from precedent.tasks import run_waiting_job as run

    return run(job_id)
