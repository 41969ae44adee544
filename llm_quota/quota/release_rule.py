"""The release rule: when a call that did not settle may be charged nothing.

A reservation that no ``settle`` ended is *released* (charged 0) only where the way
the call ended shows that the upstream billed nothing; any other ending is charged
the estimate (an upper bound), since a call that may have run must never cost
nothing. ``quota_guard``, ``@quota_gated`` and ``LLMQuotaMiddleware`` all follow it;
an explicit ``release()`` is always the caller's word. Released:

- the provider's own HTTP error answer, which providers do not bill
  (``openai.APIStatusError``, ``anthropic.APIStatusError``, ``httpx.HTTPStatusError``,
  ``requests.HTTPError``);
- a connection that was never made (``httpx.ConnectError``/``ConnectTimeout``, or
  httpx2's, aiohttp's ``ClientConnectorError`` (refused, DNS, a certificate refused,
  the proxy unreachable: its subclasses) and ``ConnectionTimeoutError``,
  ``requests.ConnectTimeout``, ``ConnectionRefusedError``, a DNS failure, or an SDK's
  ``APIConnectionError`` caused by one of these). A read timeout is not one: the call
  may have run;
- a refusal: an error status of 4xx, 502 or 503, answered by a view or raised as an
  exception Django or DRF answer with it (``ValidationError``, ``Http404``, the
  quota's own ``QuotaExceeded``...). 4xx says the request was refused, 502 and 503
  that the upstream failed or was not there. 500, 504 and the other 5xx say that
  something broke or timed out, perhaps after the upstream ran: charged;
- an exception whose class or instance says ``llm_quota_unbilled = True``: a host
  project's way to say "this never reached the LLM".

So code that called the LLM and then answers (or raises) an error must settle first.
Exception classes of SDKs are matched by package and name: no SDK is imported.
"""

from __future__ import annotations

from rest_framework.exceptions import APIException

#: httpx and its successor, which newer ``openai`` releases use.
HTTPX = ("httpx", "httpx2")
#: The provider answered with an error status.
STATUS_ERRORS = frozenset(
    {
        ("openai", "APIStatusError"),
        ("anthropic", "APIStatusError"),
        ("requests", "HTTPError"),
        *((package, "HTTPStatusError") for package in HTTPX),
    }
)
#: The connection was never made.
NOT_CONNECTED = frozenset(
    {
        ("requests", "ConnectTimeout"),
        ("builtins", "ConnectionRefusedError"),
        ("socket", "gaierror"),
        *((package, name) for package in HTTPX for name in ("ConnectError", "ConnectTimeout")),
        # aiohttp's: raised before the request was written (``gateway.async_http``).
        ("aiohttp", "ClientConnectorError"),
        ("aiohttp", "ConnectionTimeoutError"),
    }
)
#: SDK errors that wrap the transport's failure: judged by their ``__cause__``.
WRAPPERS = frozenset({("openai", "APIConnectionError"), ("anthropic", "APIConnectionError")})
#: Django's exceptions that its handler answers with a client error (by name: the
#: quota layer imports nothing of HTTP).
DJANGO_STATUSES = {
    ("django", "Http404"): 404,
    ("django", "PermissionDenied"): 403,
    ("django", "BadRequest"): 400,
    ("django", "SuspiciousOperation"): 400,
}


def unbilled_status(status: int) -> bool:
    """Whether an error status (with no ``usage`` in the answer) releases: 4xx, 502, 503."""
    return 400 <= status < 500 or status in (502, 503)


def _names(exc: BaseException) -> list[tuple[str, str]]:
    """(top-level package, class name) of ``exc``'s class and its bases, nearest first."""
    return [(cls.__module__.partition(".")[0], cls.__name__) for cls in type(exc).__mro__]


def status_of(exc: BaseException) -> int | None:
    """The status Django or DRF answer ``exc`` with, where they have one."""
    if isinstance(exc, APIException):
        return exc.status_code
    for name in _names(exc):
        if name in DJANGO_STATUSES:
            return DJANGO_STATUSES[name]
    return None


def unbilled_error(exc: BaseException) -> bool:
    """Whether ``exc`` ending a call shows that the upstream billed nothing."""
    if getattr(exc, "llm_quota_unbilled", False) is True:
        return True
    status = status_of(exc)
    if status is not None:
        return unbilled_status(status)
    names = set(_names(exc))
    if names & (STATUS_ERRORS | NOT_CONNECTED):
        return True
    if names & WRAPPERS and exc.__cause__ is not None:
        return bool(set(_names(exc.__cause__)) & NOT_CONNECTED)
    return False
