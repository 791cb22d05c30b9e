from django.contrib import admin

from .models import Embedding, EmbeddingTombstone, EncoderVersion, SearchFeedback


@admin.register(EncoderVersion)
class EncoderVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "architecture", "dim", "input_size", "created_at", "activated_at"]
    list_filter = ["status", "architecture"]
    readonly_fields = ["weights_path", "weights_sha256", "metadata", "status", "activated_at"]
    serving = (EncoderVersion.Status.ACTIVE, EncoderVersion.Status.ACTIVATING)

    def has_delete_permission(self, request, obj=None) -> bool:
        # Search serves the active version (and will serve one being activated):
        # activate another first, which retires this one.
        if obj is not None and obj.status in self.serving:
            return False
        return super().has_delete_permission(request, obj)


@admin.register(Embedding)
class EmbeddingAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "encoder", "kind", "frame", "finding", "box", "created_at"]
    list_filter = ["kind", "encoder"]
    raw_id_fields = ["instance", "finding"]
    exclude = ["vector"]


@admin.register(EmbeddingTombstone)
class EmbeddingTombstoneAdmin(admin.ModelAdmin):
    list_display = ["embedding_id", "encoder", "kind", "created_at"]


@admin.register(SearchFeedback)
class SearchFeedbackAdmin(admin.ModelAdmin):
    list_display = ["created_at", "user", "query_instance", "result_instance", "rank", "score", "relevant", "encoder"]
    list_filter = ["relevant", "encoder"]
    raw_id_fields = ["query_instance", "result_instance"]
