"""Browser pages: study list, study page with viewer, upload."""

from django.urls import path

from . import views

app_name = "studies"

urlpatterns = [
    path("", views.home, name="home"),
    path("studies/", views.study_list, name="list"),
    path("studies/<uid:study_instance_uid>/", views.study_detail, name="detail"),
    path(
        "studies/<uid:study_instance_uid>/instances/<uid:sop_instance_uid>/viewer/",
        views.instance_viewer,
        name="viewer",
    ),
    path("upload/", views.upload, name="upload"),
]
