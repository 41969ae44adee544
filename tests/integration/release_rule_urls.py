"""The ways a gated call can end without a settle, and views that end that way.

Each raising ending is real: the official ``openai`` SDK or ``httpx`` against the
tests' own upstream (``UPSTREAM``, set by the test's fixture), a port where nothing
listens, or the quota's own refusal. The views are gated by ``LLMQuotaThrottle`` (and
finished by ``LLMQuotaMiddleware``) or by ``@quota_gated``, sync and async.
"""

from __future__ import annotations

import httpx
import openai
from asgiref.sync import sync_to_async
from django.http import HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions as drf
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import JWTAuthentication

from llm_quota.decorators import quota_gated
from llm_quota.drf.throttling import LLMQuotaThrottle
from llm_quota.exceptions import BudgetExceeded

#: The tests' upstream (``tests.support.fake_upstream``), set by the fixture.
UPSTREAM = "http://127.0.0.1:1/v1"
USAGE = {"prompt_tokens": 5, "completion_tokens": 3}
MSGS = [{"role": "user", "content": "hi"}]


def _client(base_url: str | None = None, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url or UPSTREAM, api_key="sk-test", max_retries=0, **options)


def _ask(model: str, **options) -> None:
    with _client(**options) as client:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=5)


class NotCalled(Exception):
    """A host project's own exception, declared to mean "the LLM was never called"."""

    llm_quota_unbilled = True


def provider_error() -> None:
    _ask("up-500")  # openai.InternalServerError (an APIStatusError)


def provider_rate_limit() -> None:
    _ask("up-429")  # openai.RateLimitError


def status_error() -> None:
    httpx.post(f"{UPSTREAM}/chat/completions", json={"model": "up-500"}).raise_for_status()


def never_connected() -> None:
    with _client("http://127.0.0.1:1/v1") as client:  # openai.APIConnectionError
        client.chat.completions.create(model="up-normal", messages=MSGS, max_tokens=5)


def read_timeout() -> None:
    _ask("up-slow", timeout=0.05)  # openai.APITimeoutError: the call may have run


def bug_after_the_answer() -> None:
    _ask("up-normal")  # answered and billed...
    raise KeyError("choices")  # ...then the code reading it fails


def quota_refusal() -> None:
    raise BudgetExceeded("tokens_per_month", 60)  # a nested gate refused first


def declared_unbilled() -> None:
    raise NotCalled("the prompt failed a check of our own")


def client_error() -> None:
    raise drf.ValidationError({"prompt": ["too short"]})  # answered 400


def server_error() -> None:
    raise drf.APIException("something broke")  # answered 500


#: How each raising ending ends the reservation.
RAISED = {
    provider_error: "released",
    provider_rate_limit: "released",
    status_error: "released",
    never_connected: "released",
    read_timeout: "charged",
    bug_after_the_answer: "charged",
    quota_refusal: "released",
    declared_unbilled: "released",
    client_error: "released",
    server_error: "charged",
}
#: Answers a view may return without settling: (status, body, how they end it).
ANSWERED = {
    "ok": (200, {"ok": True}, "charged"),
    "usage": (200, {"usage": USAGE}, "settled"),
    "refused": (400, {"error": "bad prompt"}, "released"),
    "forbidden": (403, {"error": "not yours"}, "released"),
    "upstream_down": (502, {"error": "upstream down"}, "released"),
    "unavailable": (503, {"error": "try later"}, "released"),
    "broke": (500, {"error": "bug"}, "charged"),
    "timed_out": (504, {"error": "upstream timed out"}, "charged"),
    "error_with_usage": (502, {"error": "bad output", "usage": USAGE}, "settled"),
}
ENDINGS = {function.__name__: function for function in RAISED}


class Throttled(APIView):
    """A DRF view gated by the throttle; the middleware finishes what it leaves."""

    authentication_classes = [JWTAuthentication]
    permission_classes = [IsAuthenticated]
    throttle_classes = [LLMQuotaThrottle]

    def post(self, request, ending):
        if ending in ANSWERED:
            status, body, _ = ANSWERED[ending]
            return Response(body, status=status)
        ENDINGS[ending]()
        return Response({"ok": True})


@csrf_exempt
@quota_gated
def plain(request, ending):
    if ending in ANSWERED:
        status, body, _ = ANSWERED[ending]
        return JsonResponse(body, status=status)
    ENDINGS[ending]()
    return HttpResponse("ok")


@csrf_exempt
@quota_gated
async def aplain(request, ending):
    if ending in ANSWERED:
        status, body, _ = ANSWERED[ending]
        return JsonResponse(body, status=status)
    await sync_to_async(ENDINGS[ending], thread_sensitive=False)()
    return HttpResponse("ok")


urlpatterns = [
    path("drf/<str:ending>", Throttled.as_view()),
    path("plain/<str:ending>", plain),
    path("aplain/<str:ending>", aplain),
]
