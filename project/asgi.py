"""The demo project under an ASGI server (``uvicorn project.asgi:application``).

Served this way, ``/v1/chat/completions`` is the async view (``llm_quota.gateway.async_views``):
no thread waits on Redis or on the upstream. ``LLM_QUOTA_ASYNC_GATEWAY=0`` serves the
DRF view instead. ``warm_up()`` loads the tokenizers before the first request, so that
loading them never stalls a worker's event loop.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("LLM_QUOTA_ASYNC_GATEWAY", "1")
application = get_asgi_application()

from llm_quota.gateway.async_views import warm_up  # noqa: E402 - needs the app registry

warm_up()
