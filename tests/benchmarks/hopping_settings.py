"""The demo's settings with Django's seven middleware as Django ships them (bench-only):
async-capable ``MiddlewareMixin`` classes, two thread hops each under ASGI, where the
demo marks them sync-only (``project/middleware.py``)."""

from project.settings import *  # noqa: F403

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "llm_quota.middleware.LLMQuotaMiddleware",
]
