"""The demo's ASGI module on Django's own ``ASGIHandler`` (bench-only): section 10 serves
it beside ``project.asgi`` (``llm_quota.gateway.asgi.ThreadedASGIHandler``) to price a
fresh thread per request against a kept one, in the same run."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("LLM_QUOTA_ASYNC_GATEWAY", "1")
application = get_asgi_application()

from llm_quota.gateway.async_views import warm_up  # noqa: E402 - needs the app registry

warm_up()
