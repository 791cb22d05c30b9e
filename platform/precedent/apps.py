from django.apps import AppConfig


class PrecedentConfig(AppConfig):
    name = "precedent"
    verbose_name = "Precedent"
