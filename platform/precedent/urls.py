from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.http import HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from precedent import converters  # noqa: F401  (registers <uid:...> before the apps' URLs load)
from precedent.api import login_not_required_view


@login_not_required
def favicon(request):
    """Browsers ask for /favicon.ico on pages that name no icon (the admin, the API docs)."""
    return HttpResponsePermanentRedirect(static("img/favicon.svg"))


handler404 = "precedent.api.not_found"

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("favicon.ico", favicon, name="favicon"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("api/v1/schema/", login_not_required_view(SpectacularAPIView.as_view()), name="schema"),
    path(
        "api/v1/schema/docs/",
        login_not_required_view(SpectacularSwaggerView.as_view(url_name="schema")),
        name="schema-docs",
    ),
    path("api/v1/search/", include("embeddings.api_urls", namespace="search-api")),
    path("api/v1/", include("triage.api_urls", namespace="triage-api")),
    path("api/v1/", include("exports.api_urls", namespace="exports-api")),
    path("api/v1/", include("studies.api_urls", namespace="api")),
    path("dicomweb/", include("dicomweb.urls")),
    path("worklist/", include("triage.urls")),
    path("search/", include("embeddings.urls")),
    path("exports/", include("exports.urls")),
    path("audit/", include("access.urls")),
    path("", include("studies.urls")),
]
