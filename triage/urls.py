"""Worklist pages (/worklist/): the list, its polling bar, read marks, evidence."""

from django.urls import path

from . import views

app_name = "triage"

urlpatterns = [
    path("", views.worklist, name="worklist"),
    path("changes/", views.worklist_changes, name="changes"),
    path("<str:study_instance_uid>/read/", views.mark_read, name="read"),
    path("<str:study_instance_uid>/evidence/", views.evidence, name="evidence"),
]
