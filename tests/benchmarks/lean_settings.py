"""The demo project's settings with only the middleware the gateway uses (bench-only).

Under ASGI each of Django's own middleware (``MiddlewareMixin``) runs its
``process_request`` and ``process_response`` through ``sync_to_async``: two thread
hops apiece. Section 10 serves these settings beside the demo's to price them.
"""

from project.settings import *  # noqa: F403

MIDDLEWARE = ["llm_quota.middleware.LLMQuotaMiddleware"]
