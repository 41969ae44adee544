"""The demo's settings for workers that serve only the gateway (``/v1/``).

Run them beside the demo's own workers, a reverse proxy sending ``/v1/`` here::

    DJANGO_SETTINGS_MODULE=project.gateway_settings \\
        uvicorn project.asgi:application --workers 2 --loop uvloop --http httptools

Under ASGI each of Django's own middleware (``MiddlewareMixin``) runs its halves
through ``sync_to_async``: two thread hops apiece, for sessions, messages, CSRF and
clickjacking the gateway does not use. ``LLMQuotaMiddleware`` is async-capable and
hops nowhere. With 1,000 streams open the demo's seven decided the first byte's p99
(docs: benchmarks, long streams).
"""

from project.settings import *  # noqa: F403

MIDDLEWARE = ["llm_quota.middleware.LLMQuotaMiddleware"]

# The admin needs sessions and authentication middleware; these workers do not serve it.
SILENCED_SYSTEM_CHECKS = ["admin.E408", "admin.E409", "admin.E410"]
