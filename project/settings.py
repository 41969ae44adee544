"""Settings of the demo project that shows llm_quota in use.

Everything that differs between a laptop and production comes from the environment:
no REDIS_URL means an embedded Redis, no DATABASE_URL SQLite, no OPENAI_BASE_URL the
fake provider.
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url

from project.embedded_redis import embedded_redis_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("LLMQ_VAR_DIR", BASE_DIR / "var"))

SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY", "demo-only-insecure-key-change-me-0123456789abcdef"
)
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "llm_quota",
    "project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
WSGI_APPLICATION = "project.wsgi.application"
ASGI_APPLICATION = "project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=60
    )
}
# PostgreSQL: a pool of connections per process (psycopg_pool, Django 5.1+), never a
# connection kept per thread. runserver gives every request a thread, and an ASGI
# worker every request its own thread for sync code: kept connections piled up until
# max_connections refused the next request. Each process now holds at most
# DATABASE_POOL_MAX_SIZE connections; a request waits up to DATABASE_POOL_TIMEOUT
# seconds for one (then a 500), and the gateway hands its connection back before it
# waits on the upstream. A pool needs CONN_MAX_AGE = 0.
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": int(os.environ.get("DATABASE_POOL_MAX_SIZE", "8")),
        "timeout": float(os.environ.get("DATABASE_POOL_TIMEOUT", "10")),
    }

# Redis under Sentinel: REDIS_SENTINELS="host:port,host:port,host:port" and the service
# Sentinel monitors, REDIS_SENTINEL_SERVICE ("mymaster"): django-redis' Sentinel client
# talks to whichever server the Sentinels name primary (docs: operations, Sentinel).
REDIS_SENTINELS = [
    (host, int(port))
    for host, _, port in (
        a.rpartition(":") for a in os.environ.get("REDIS_SENTINELS", "").split(",")
    )
    if port
]
REDIS_SENTINEL_SERVICE = os.environ.get("REDIS_SENTINEL_SERVICE", "mymaster")
if REDIS_SENTINELS:
    REDIS_URL = f"redis://{REDIS_SENTINEL_SERVICE}/0"
else:
    REDIS_URL = os.environ.get("REDIS_URL") or embedded_redis_url(VAR_DIR / "redis")
CACHES = {
    "default": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.DefaultClient",
            "SOCKET_CONNECT_TIMEOUT": 1,
            "SOCKET_TIMEOUT": 1,
        },
    }
}
if REDIS_SENTINELS:
    DJANGO_REDIS_CONNECTION_FACTORY = "django_redis.pool.SentinelConnectionFactory"
    CACHES["default"]["OPTIONS"].update(
        CLIENT_CLASS="django_redis.client.SentinelClient", SENTINELS=REDIS_SENTINELS
    )

LLM_QUOTA = {
    "KEY_PREFIX": os.environ.get("LLM_QUOTA_KEY_PREFIX", "llmq"),
    "FAIL_OPEN": os.environ.get("LLM_QUOTA_FAIL_OPEN", "1") == "1",
    # Usage that could not reach Redis outlives the process (docs: reliability).
    # LLMQ_JOURNAL_DIR="" keeps it in memory only (the test suite does).
    "JOURNAL_DIR": os.environ.get("LLMQ_JOURNAL_DIR", str(VAR_DIR / "journal")) or None,
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # simplejwt's JWTAuthentication, its user from the config cache (no query once warm)
        "llm_quota.authentication.CachedJWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Password guessing at /api/token/: requests per client address, per minute.
    "DEFAULT_THROTTLE_RATES": {"llm_quota_token": "20/minute"},
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": timedelta(minutes=30),
    "REFRESH_TOKEN_LIFETIME": timedelta(days=1),
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"llm_quota": {"handlers": ["console"], "level": "INFO"}},
}

# -- the OpenAI-compatible gateway ---------------------------------------------------
# The middleware finishes reservations the DRF throttle admitted and the view left open.
MIDDLEWARE += ["llm_quota.middleware.LLMQuotaMiddleware"]
# No OPENAI_BASE_URL: the demo opts into the offline, deterministic fake provider.
LLM_QUOTA.update(
    UPSTREAM=None if os.environ.get("OPENAI_BASE_URL") else "llm_quota.testing.FakeProvider",
    OPENAI_BASE_URL=os.environ.get("OPENAI_BASE_URL") or None,
    OPENAI_API_KEY=os.environ.get("OPENAI_API_KEY") or None,
    # project/asgi.py turns the async chat view on; LLM_QUOTA_ASYNC_GATEWAY=0 keeps DRF's.
    ASYNC_GATEWAY=os.environ.get("LLM_QUOTA_ASYNC_GATEWAY", "0") == "1",
)
# -- Usage reporting: Celery, the snapshot schedule, the OpenAPI schema -------------
# Celery's broker defaults to the same Redis as the ledger.
# kombu spells redis-py's unix:// socket URLs redis+socket://.
_CELERY_REDIS = (
    "redis+socket://" + REDIS_URL.removeprefix("unix://")
    if REDIS_URL.startswith("unix://")
    else REDIS_URL
)
if REDIS_SENTINELS:  # kombu's spelling: one sentinel:// URL per Sentinel
    _CELERY_REDIS = ";".join(f"sentinel://{host}:{port}/0" for host, port in REDIS_SENTINELS)
    CELERY_BROKER_TRANSPORT_OPTIONS = {"master_name": REDIS_SENTINEL_SERVICE}
    CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"master_name": REDIS_SENTINEL_SERVICE}
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or _CELERY_REDIS
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND") or _CELERY_REDIS
CELERY_RESULT_EXPIRES = 3600
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "celery")
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
if os.environ.get("LLM_QUOTA_SNAPSHOT_INTERVAL"):
    LLM_QUOTA["SNAPSHOT_INTERVAL"] = float(os.environ["LLM_QUOTA_SNAPSHOT_INTERVAL"])
if os.environ.get("LLM_QUOTA_ALERT_WEBHOOK_URL"):
    LLM_QUOTA["ALERT_WEBHOOK_URL"] = os.environ["LLM_QUOTA_ALERT_WEBHOOK_URL"]

INSTALLED_APPS += ["drf_spectacular"]
REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "drf_spectacular.openapi.AutoSchema"
SPECTACULAR_SETTINGS = {
    "TITLE": "django-llm-quota",
    "DESCRIPTION": "Per-user LLM token quotas: usage, history and tiers.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
}

# Redis Cluster (REDIS_URL=redis+cluster://host:port[,host:port...]): django-redis has no
# cluster client, so the quota ledger builds redis-py's RedisCluster itself, and
# Django's own cache stays in process memory. Set CELERY_BROKER_URL to a plain Redis or
# RabbitMQ: Celery cannot use a cluster as its broker.
if REDIS_URL.startswith(("redis+cluster://", "rediss+cluster://")):
    LLM_QUOTA["REDIS_CLUSTER_URL"] = REDIS_URL
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
