"""/api/v1/search/ routes."""

from django.urls import path

from . import apis

app_name = "search-api"

urlpatterns = [
    path("", apis.SearchApi.as_view(), name="search"),
    path("feedback/", apis.FeedbackApi.as_view(), name="feedback"),
]
