"""Django's middleware for the demo, each marked sync-only (``gateway.asgi.sync_only``).

Under ASGI a sync-only run of middleware costs two thread hops a request in all, where
the same classes as Django ships them cost two each: 14 for these seven, about 0.8 ms of
CPU per request of the async gateway (docs: benchmarks, section 10). Under WSGI nothing
changes. Keep them together, outside ``LLMQuotaMiddleware`` (async-capable), so that
they stay one run.
"""

from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.middleware import clickjacking, common, csrf, security

from llm_quota.gateway.asgi import sync_only

SecurityMiddleware = sync_only(security.SecurityMiddleware)
SessionMiddleware = sync_only(sessions.SessionMiddleware)
CommonMiddleware = sync_only(common.CommonMiddleware)
CsrfViewMiddleware = sync_only(csrf.CsrfViewMiddleware)
AuthenticationMiddleware = sync_only(auth.AuthenticationMiddleware)
MessageMiddleware = sync_only(messages.MessageMiddleware)
XFrameOptionsMiddleware = sync_only(clickjacking.XFrameOptionsMiddleware)
