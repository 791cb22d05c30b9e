"""/api/v1/ routes for triage: the worklist and one study's triage."""

from django.urls import path

from . import apis

app_name = "triage-api"

urlpatterns = [
    path("worklist/", apis.WorklistApi.as_view(), name="worklist"),
    path("studies/<uid:study_instance_uid>/triage/", apis.StudyTriageApi.as_view(), name="study-triage"),
    path("instances/<uid:sop_instance_uid>/overlays/", apis.InstanceOverlaysApi.as_view(), name="instance-overlays"),
    path(
        "instances/<uid:sop_instance_uid>/masks/<str:mask_id>.png", apis.InstanceMaskApi.as_view(), name="instance-mask"
    ),
]
