"""The release rule's verdicts, exception by exception (no Redis: the adapters' wiring
is ``tests/integration/test_release_rule.py``)."""

from __future__ import annotations

import asyncio
import ssl
from types import SimpleNamespace

import aiohttp
import httpx
import openai
import pytest
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions as drf

from llm_quota.exceptions import BudgetExceeded, QuotaUnavailable, RateLimited
from llm_quota.quota.release_rule import unbilled_error, unbilled_status

#: The connection an aiohttp connect error names (only its host and port are read).
KEY = SimpleNamespace(host="api.example.com", port=443, ssl=True)
REQUEST = httpx.Request("POST", "https://api.example.com/v1/chat/completions")


def caused(wrapper: BaseException, cause: BaseException) -> BaseException:
    wrapper.__cause__ = cause
    return wrapper


def status(code: int) -> openai.APIStatusError:
    response = httpx.Response(code, request=REQUEST)
    return openai.APIStatusError("error", response=response, body=None)


class Declared(Exception):
    llm_quota_unbilled = True


class Anthropic:
    """Stands in for ``anthropic``'s classes, matched by package and name."""

    class APIStatusError(Exception):
        __module__ = "anthropic._exceptions"


@pytest.mark.parametrize(
    "exc",
    [
        status(400),
        status(429),
        status(500),
        Anthropic.APIStatusError(),
        httpx.HTTPStatusError("502", request=REQUEST, response=httpx.Response(502)),
        httpx.ConnectError("refused"),
        httpx.ConnectTimeout("no answer to SYN"),
        caused(openai.APIConnectionError(request=REQUEST), httpx.ConnectError("refused")),
        caused(openai.APITimeoutError(request=REQUEST), httpx.ConnectTimeout("connect")),
        ConnectionRefusedError(),
        # aiohttp's, which the async gateway's upstream calls raise (gateway.async_http)
        aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")),
        aiohttp.ClientConnectorDNSError(KEY, OSError(-2, "Name or service not known")),
        aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError(1, "self")),
        aiohttp.ConnectionTimeoutError("connect"),
        RateLimited("requests_per_minute", 5),
        BudgetExceeded("tokens_per_month", 60),
        QuotaUnavailable(),
        drf.ValidationError("bad prompt"),
        drf.NotFound(),
        Http404(),
        PermissionDenied(),
        RequestDataTooBig(),
        Declared(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_what_shows_nothing_was_billed_releases(exc):
    assert unbilled_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("choices"),
        RuntimeError("a bug"),
        httpx.ReadTimeout("no answer"),
        httpx.RemoteProtocolError("peer closed mid-answer"),
        caused(openai.APITimeoutError(request=REQUEST), httpx.ReadTimeout("read")),
        caused(openai.APIConnectionError(request=REQUEST), httpx.ReadError("reset")),
        openai.APIConnectionError(request=REQUEST),  # no cause: nothing proven
        aiohttp.SocketTimeoutError("read"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut mid-answer"),
        aiohttp.ClientOSError(104, "reset"),
        asyncio.CancelledError(),
        KeyboardInterrupt(),
        drf.APIException("broke"),  # 500
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_anything_else_is_charged_the_estimate(exc):
    assert not unbilled_error(exc)


def test_error_statuses_release_for_refusals_and_a_failed_upstream_only():
    assert [code for code in range(400, 600) if unbilled_status(code)] == [
        *range(400, 500),
        502,
        503,
    ]
