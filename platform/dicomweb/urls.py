"""/dicomweb/ routes."""

app_name = "dicomweb"

urlpatterns: list = []
