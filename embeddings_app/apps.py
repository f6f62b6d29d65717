from django.apps import AppConfig


class EmbeddingsAppConfig(AppConfig):
    name = "embeddings_app"
    label = "embeddings_app"
    verbose_name = "Embeddings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import worker_init, worker_ready

        from . import checks, devices, signals  # noqa: F401  (registers the system checks)

        signals.connect()
        # A worker validates its device options before taking a task (docs/devices.md).
        worker_init.connect(devices.on_worker_init, dispatch_uid="embeddings_app.devices")
        worker_ready.connect(devices.on_worker_ready, dispatch_uid="embeddings_app.devices")
