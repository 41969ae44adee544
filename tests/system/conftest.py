"""The system group: several processes, a cluster, uvicorn/gunicorn, the browser, a
Redis killed or restarted. Every module here is marked ``slow``
(``pytest -m "not slow"`` leaves them out).

The Redis fixtures are imported by name, as in ``tests/integration/conftest.py``.
"""

import pytest

from tests.support.fake_upstream import UpstreamServer
from tests.support.fixtures import (  # noqa: F401
    cluster_client,
    cluster_ledger,
    ledger,
    private_redis,
    quota_prefix,
    redis_client,
    redis_cluster,
    sync_io_on_loop,
)


@pytest.fixture
def upstream():
    """The tests' own upstream server (``fake_upstream``), for the servers a test starts."""
    server = UpstreamServer().start()
    yield server
    server.hold.set()  # a failed test must not leave streams waiting
    server.stop()
