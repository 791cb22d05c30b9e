"""/api/v1/ routes for exports."""

from django.urls import path

from . import apis

app_name = "exports-api"

urlpatterns = [
    path("exports/deid/", apis.DeidExportApi.as_view(), name="deid"),
    path("instances/<uid:sop_instance_uid>/ai-results/", apis.AiResultsApi.as_view(), name="ai-results"),
]
