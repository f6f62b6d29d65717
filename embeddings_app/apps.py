from django.apps import AppConfig


class EmbeddingsAppConfig(AppConfig):
    name = "embeddings_app"
    label = "embeddings_app"
    verbose_name = "Embeddings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, signals  # noqa: F401  (registers the system checks)

        signals.connect()
