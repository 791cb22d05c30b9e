from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/search/", include("embeddings.api_urls", namespace="search-api")),
    path("api/v1/", include("studies.api_urls", namespace="api")),
    path("search/", include("embeddings.urls")),
    path("", include("studies.urls")),
]
