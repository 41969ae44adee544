"""The integration group: one Redis (embedded, or REDIS_URL) and the database.

The Redis fixtures are imported by name: pytest honours ``pytest_plugins`` only in the
rootdir's conftest, and loading them there would give the unit group the autouse
``quota_prefix``, which talks to Redis before every test.
"""

from tests.support.fixtures import (  # noqa: F401
    ledger,
    private_redis,
    quota_prefix,
    redis_client,
    sync_io_on_loop,
)
