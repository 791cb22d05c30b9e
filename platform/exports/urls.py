"""Page routes for exports: the buttons on the study, search and viewer pages post here."""

from django.urls import path

from . import views

app_name = "exports"

urlpatterns = [
    path("deid/", views.deid_export, name="deid"),
    path("instances/<uid:sop_instance_uid>/ai-results/", views.ai_results, name="ai-results"),
]
