from django.apps import AppConfig


class EmbeddingsConfig(AppConfig):
    """Similar-case search: CNN embeddings in PostgreSQL, served from a FAISS index."""

    name = "embeddings"
    verbose_name = "Embeddings and similar-case search"

    def ready(self) -> None:
        # Registers the signal receivers and the background jobs.
        from . import receivers, services  # noqa: F401
