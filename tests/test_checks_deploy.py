"""The cutover settings are validated by `manage.py check`; the deploy check also reports an active
version whose model alias is gone."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from embeddings_app.config import get_config
from embeddings_app.models import EmbeddingVersion
from tests.conftest import TARGET


@pytest.mark.parametrize(("key", "value", "message"), [
    ("ACTIVE_CACHE_TTL", -1, 'EMBEDDINGS["ACTIVE_CACHE_TTL"] must be a number of seconds >= 0'),
    ("DROP_GRACE_PERIOD", "1 day", 'EMBEDDINGS["DROP_GRACE_PERIOD"] must be a number of seconds'),
    ("VERIFY_MAX_AGE", True, 'EMBEDDINGS["VERIFY_MAX_AGE"] must be a number of seconds'),
    ("VERIFY_THRESHOLD", 1.5, 'EMBEDDINGS["VERIFY_THRESHOLD"] must be a cosine similarity'),
    ("VERIFY_SAMPLE", 0, 'EMBEDDINGS["VERIFY_SAMPLE"] must be a positive integer'),
])
def test_bad_cutover_settings_are_reported_by_check(key, value, message):
    with override_settings(EMBEDDINGS={**settings.EMBEDDINGS, key: value}), \
            pytest.raises(SystemCheckError) as failure:
        call_command("check")
    assert message in str(failure.value)


def test_cutover_settings_are_parsed_with_defaults():
    config = get_config()
    assert (config.active_cache_ttl, config.verify_threshold, config.verify_sample,
            config.verify_max_age, config.drop_grace_period) == (1.0, 0.999, 200, 86400.0, 86400.0)
    custom = {**settings.EMBEDDINGS, "ACTIVE_CACHE_TTL": 0, "VERIFY_THRESHOLD": 0.99,
              "VERIFY_SAMPLE": 50, "VERIFY_MAX_AGE": 60, "DROP_GRACE_PERIOD": 3600}
    with override_settings(EMBEDDINGS=custom):
        config = get_config()
    assert (config.active_cache_ttl, config.verify_threshold, config.verify_sample,
            config.verify_max_age, config.drop_grace_period) == (0.0, 0.99, 50, 60.0, 3600.0)


@pytest.mark.django_db
def test_check_deploy_reports_an_active_version_whose_alias_is_gone(make_articles):
    make_articles(3)
    call_command("embeddings", "add", TARGET, "v1", "--model", "tiny")
    call_command("embeddings", "backfill", TARGET, "v1", "--inline")
    call_command("embeddings", "activate", TARGET, "v1", "--force")
    EmbeddingVersion.objects.filter(target=TARGET, version="v1").update(model_alias="gone")
    with pytest.raises(SystemCheckError) as failure:
        call_command("check", "--deploy")
    assert "embeddings.E102" in str(failure.value)
    assert 'Unknown model alias "gone"' in str(failure.value)
