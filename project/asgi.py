"""The demo project under an ASGI server (``uvicorn project.asgi:application``).

Served this way, ``/v1/chat/completions`` is the async view (``llm_quota.gateway.async_views``):
no thread waits on Redis or on the upstream. ``LLM_QUOTA_ASYNC_GATEWAY=0`` serves the
DRF view instead. ``warm_up()`` loads the tokenizers before the first request, so that
loading them never stalls a worker's event loop. The handler is Django's, except that
a request's thread for sync code is kept for later requests rather than started anew
(``llm_quota.gateway.asgi``): two thread starts fewer per request.
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("LLM_QUOTA_ASYNC_GATEWAY", "1")

from llm_quota.gateway.asgi import get_asgi_application  # noqa: E402 - after the settings

application = get_asgi_application()

from llm_quota.gateway.async_views import warm_up  # noqa: E402 - needs the app registry

warm_up()
