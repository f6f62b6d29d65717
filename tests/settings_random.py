"""Settings of the operator processes of tests/test_lifecycle_random.py: a short drop grace
period (longer than the readers' active-version TTL, as in production) so drops happen."""

from tests.settings import *  # noqa: F403
from tests.settings import EMBEDDINGS

ACTIVE_CACHE_TTL = 0.5
DROP_GRACE_PERIOD = 3.0
EMBEDDINGS = {**EMBEDDINGS, "ACTIVE_CACHE_TTL": ACTIVE_CACHE_TTL,
              "DROP_GRACE_PERIOD": DROP_GRACE_PERIOD}
