"""/api/v1/ routes for studies and instances."""

from django.urls import path

from . import apis

app_name = "api"

urlpatterns = [
    path("studies/", apis.StudyListApi.as_view(), name="study-list"),
    path("studies/<uid:study_instance_uid>/", apis.StudyDetailApi.as_view(), name="study-detail"),
    path("instances/", apis.InstanceUploadApi.as_view(), name="instance-upload"),
    path("instances/<uid:sop_instance_uid>/", apis.InstanceDetailApi.as_view(), name="instance-detail"),
    path("instances/<uid:sop_instance_uid>/file", apis.InstanceFileApi.as_view(), name="instance-file"),
    path("instances/<uid:sop_instance_uid>/preview.png", apis.InstancePreviewApi.as_view(), name="instance-preview"),
    path(
        "instances/<uid:sop_instance_uid>/thumbnail.png", apis.InstanceThumbnailApi.as_view(), name="instance-thumbnail"
    ),
]
