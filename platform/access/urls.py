"""/audit/: the audit log (admins only, per policy.py)."""

from django.urls import path

from . import views

app_name = "access"

urlpatterns = [
    path("", views.audit_log, name="audit-log"),
    path("export.csv", views.audit_export, name="audit-export"),
]
