"""Views for the throttle and middleware tests: a DRF view per way of ending a call."""

import json

from django.http import JsonResponse, StreamingHttpResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import JWTAuthentication

from llm_quota import quota_guard
from llm_quota.authentication import ApiKeyAuthentication
from llm_quota.decorators import quota_gated
from llm_quota.drf.throttling import LLMQuotaThrottle
from llm_quota.shapes.chat import ChatRequest

USAGE = {"prompt_tokens": 5, "completion_tokens": 3}


class Gated(APIView):
    authentication_classes = [JWTAuthentication]
    permission_classes = [IsAuthenticated]
    throttle_classes = [LLMQuotaThrottle]
    outcome = "settle"

    def post(self, request):
        if self.outcome == "settle":
            request.llm_quota.settle(USAGE)
            return Response({"max_tokens": request.llm_quota.max_tokens})
        if self.outcome == "usage":
            return Response({"usage": USAGE})
        if self.outcome == "nothing":
            return Response({"ok": True})
        if self.outcome == "fail":
            return Response({"error": "upstream down"}, status=502)
        raise RuntimeError("a bug in the view")


class Keyed(Gated):
    """A host view taking API keys: ``request.auth`` is the key, the throttle reads it."""

    authentication_classes = [ApiKeyAuthentication, JWTAuthentication]


class Anonymous(Gated):
    permission_classes = [AllowAny]


class Guarded(APIView):
    """The guard style in a DRF view: its refusal is left to DRF's default handler."""

    authentication_classes = [JWTAuthentication]
    permission_classes = [IsAuthenticated]

    def post(self, request):
        with quota_guard(request.user, **ChatRequest.from_body(request.data).quota_kwargs()) as q:
            q.settle(USAGE)
        return Response({"ok": True})


@csrf_exempt
def plain_guarded(request):
    """The guard style in a plain view (a session user), its refusal not caught."""
    body = ChatRequest.from_body(json.loads(request.body))
    with quota_guard(request.user, **body.quota_kwargs()) as quota:
        quota.settle(USAGE)
    return JsonResponse({"ok": True})


@csrf_exempt
@quota_gated
def plain(request):
    return JsonResponse({"usage": USAGE, "max_tokens": request.llm_quota.max_tokens})


@csrf_exempt
@quota_gated
def plain_stream(request):
    guard = request.llm_quota

    def tokens():
        yield b"one "
        yield b"two"
        guard.settle_output("one two")

    return StreamingHttpResponse(tokens())


@csrf_exempt
@quota_gated
def plain_stream_unsettled(request):
    return StreamingHttpResponse(iter([b"a", b"b"]))


urlpatterns = [
    path("drf/settle", Gated.as_view(outcome="settle")),
    path("drf/usage", Gated.as_view(outcome="usage")),
    path("drf/nothing", Gated.as_view(outcome="nothing")),
    path("drf/fail", Gated.as_view(outcome="fail")),
    path("drf/raise", Gated.as_view(outcome="raise")),
    path("drf/anonymous", Anonymous.as_view()),
    path("drf/keyed", Keyed.as_view(outcome="settle")),
    path("drf/guarded", Guarded.as_view()),
    path("plain/guarded", plain_guarded),
    path("plain", plain),
    path("plain/stream", plain_stream),
    path("plain/stream-unsettled", plain_stream_unsettled),
]
