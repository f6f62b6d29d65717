from celery.signals import worker_init, worker_ready
from django.apps import AppConfig


class EmbeddingsAppConfig(AppConfig):
    name = "embeddings_app"
    label = "embeddings_app"
    verbose_name = "Embeddings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Load-bearing lazy import: these modules import the app's models, which exist only once
        # the app registry is ready (it is, when ready() runs); importing checks registers them.
        from . import checks, devices, signals  # noqa: F401

        signals.connect()
        # A worker validates its device options before taking a task (docs/devices.md).
        worker_init.connect(devices.on_worker_init, dispatch_uid="embeddings_app.devices")
        worker_ready.connect(devices.on_worker_ready, dispatch_uid="embeddings_app.devices")
