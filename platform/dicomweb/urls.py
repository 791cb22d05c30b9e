"""/dicomweb/ routes (PS3.18): STOW-RS, QIDO-RS and WADO-RS resources.

UIDs in paths are digits and dots, so anything else is a 404 before a view runs.
"""

from django.urls import re_path

from precedent.converters import UID_PATTERN

from . import views

app_name = "dicomweb"

UID = UID_PATTERN
STUDY = rf"studies/(?P<study>{UID})"
SERIES = rf"{STUDY}/series/(?P<series>{UID})"
INSTANCE = rf"{SERIES}/instances/(?P<instance>{UID})"
FRAMES = rf"{INSTANCE}/frames/(?P<frame_list>[^/]+)"

urlpatterns = [
    re_path(r"^studies$", views.StudiesView.as_view(), name="studies"),
    re_path(rf"^{STUDY}$", views.StudyView.as_view(), name="study"),
    re_path(rf"^{STUDY}/metadata$", views.MetadataView.as_view(), name="study-metadata"),
    re_path(rf"^{STUDY}/series$", views.SeriesSearchView.as_view(), name="study-series"),
    re_path(rf"^{STUDY}/instances$", views.InstancesSearchView.as_view(), name="study-instances"),
    re_path(rf"^{SERIES}$", views.SeriesView.as_view(), name="series"),
    re_path(rf"^{SERIES}/metadata$", views.MetadataView.as_view(), name="series-metadata"),
    re_path(rf"^{SERIES}/instances$", views.InstancesSearchView.as_view(), name="series-instances"),
    re_path(rf"^{INSTANCE}$", views.InstanceView.as_view(), name="instance"),
    re_path(rf"^{INSTANCE}/metadata$", views.MetadataView.as_view(), name="instance-metadata"),
    re_path(rf"^{INSTANCE}/rendered$", views.RenderedView.as_view(), name="instance-rendered"),
    re_path(rf"^{INSTANCE}/bulk/(?P<tag>[0-9A-Fa-f]{{8}})$", views.BulkDataView.as_view(), name="instance-bulk"),
    re_path(rf"^{FRAMES}$", views.FramesView.as_view(), name="frames"),
    re_path(rf"^{FRAMES}/rendered$", views.RenderedView.as_view(), name="frames-rendered"),
    re_path(r"^series$", views.SeriesSearchView.as_view(), name="all-series"),
    re_path(r"^instances$", views.InstancesSearchView.as_view(), name="all-instances"),
]
