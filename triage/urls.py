"""Worklist pages (/worklist/): the list, its polling bar, read marks, evidence; calibration."""

from django.urls import path

from . import views

app_name = "triage"

urlpatterns = [
    path("", views.worklist, name="worklist"),
    path("calibration/", views.calibration, name="calibration"),
    path("calibration/<int:pk>/curves.png", views.calibration_curves, name="calibration-curves"),
    path("calibration/<int:pk>/sign-off/", views.calibration_sign_off, name="calibration-sign-off"),
    path("calibration/<int:pk>/at-threshold/", views.calibration_at_threshold, name="calibration-at-threshold"),
    path("changes/", views.worklist_changes, name="changes"),
    path("<uid:study_instance_uid>/read/", views.mark_read, name="read"),
    path("<uid:study_instance_uid>/evidence/", views.evidence, name="evidence"),
]
