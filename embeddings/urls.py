"""Search pages (/search/): the search page, the comparison, feedback on results."""

from django.urls import path

from . import views

app_name = "search"

urlpatterns = [
    path("", views.search, name="search"),
    path("compare/", views.compare, name="compare"),
    path("feedback/", views.feedback, name="feedback"),
]
