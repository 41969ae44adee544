"""The demo project behind Sentinel: ``REDIS_SENTINELS`` (and ``REDIS_SENTINEL_SERVICE``)
put its cache on django-redis' Sentinel client, as docs/pages/operations.md configures
it, and its Celery broker on the same Sentinels, whatever ``REDIS_URL`` says. The chaos
soak runs the demo this way (``tests/soak``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.loadtest.harness import ROOT


def test_redis_sentinels_put_the_demo_cache_and_broker_behind_the_sentinels():
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "project.settings",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # ignored: the Sentinels name the server
        "REDIS_SENTINELS": "127.0.0.1:26001,10.0.0.2:26002",
        "REDIS_SENTINEL_SERVICE": "quota",
    }  # fmt: skip
    probe = (
        "import json; from django.conf import settings as s; c = s.CACHES['default']; "
        "print(json.dumps([s.DJANGO_REDIS_CONNECTION_FACTORY, c['LOCATION'], c['OPTIONS'], "
        "s.CELERY_BROKER_URL, s.CELERY_BROKER_TRANSPORT_OPTIONS]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    factory, location, options, broker, transport = json.loads(done.stdout.splitlines()[-1])
    assert factory == "django_redis.pool.SentinelConnectionFactory"
    assert location == "redis://quota/0"
    assert options["CLIENT_CLASS"] == "django_redis.client.SentinelClient"
    assert options["SENTINELS"] == [["127.0.0.1", 26001], ["10.0.0.2", 26002]]
    assert broker == "sentinel://127.0.0.1:26001/0;sentinel://10.0.0.2:26002/0"
    assert transport == {"master_name": "quota"}
