"""One admitted call, from its reservation to its answer: what every gated view shares.

Every view, of every API shape (chat completions, responses, embeddings: one request
adapter each, ``shapes.base.ShapeRequest``), sync or async, reads top to bottom:
authenticate → scope → parse once (``ChatRequest``, ``ResponsesRequest``...) → admit
(``QuotaGuard``) → ``GatedCall(...).answer()`` (or ``aanswer()``). From admission
on, the call owns the reservation and ends it exactly once, whatever happens: settled
from the answer (a stream settles itself as it ends, ``relay``), released when the
upstream fails or anything raises, even building the upstream's body. ``GatedCall``
makes every decision; ``answer`` and ``aanswer`` add only the waiting.

A failed upstream call is released by the release rule (``quota.release_rule``): its
error answer, or a connection never made, billed nothing; after a timeout or an answer
that could not be read, the call may have run, and the estimate is charged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from django.http import HttpResponseBase, JsonResponse, StreamingHttpResponse
from rest_framework.exceptions import APIException

from llm_quota.drf.errors import response_for_exception
from llm_quota.drf.throttling import admission_headers
from llm_quota.exceptions import InvalidRequest
from llm_quota.gateway.database import ahand_back, hand_back
from llm_quota.gateway.relay import AsyncRelay, Relay
from llm_quota.gateway.settlement import asettle, settle
from llm_quota.gateway.upstream import (
    CHAT_PATH,
    AsyncUpstreamStream,
    Upstream,
    UpstreamError,
    UpstreamStream,
    get_upstream,
)
from llm_quota.quota.guard import QuotaGuard
from llm_quota.quota.release_rule import unbilled_error
from llm_quota.shapes.base import ShapeRequest

logger = logging.getLogger("llm_quota")

#: Upstream errors that are its own answer, or no call at all: nothing was billed.
ANSWERED = frozenset({"upstream_error", "upstream_auth_failed", "upstream_not_configured"})


def billed_nothing(exc: UpstreamError) -> bool:
    """Whether a failed upstream call may be released: the upstream's error answer, or
    a transport failure that shows no connection was made (``release_rule``)."""
    cause = exc.__cause__
    return exc.code in ANSWERED or (cause is not None and unbilled_error(cause))


def upstream_error_response(exc: UpstreamError) -> JsonResponse:
    """The upstream's status and its own OpenAI-shaped error where it sent one."""
    error = dict(exc.error or {})
    error["message"] = str(error.get("message") or exc.message)
    error["type"] = str(
        error.get("type") or ("server_error" if exc.status >= 500 else "upstream_error")
    )
    error["code"] = error.get("code") or exc.code
    error.setdefault("param", None)
    response = JsonResponse({"error": error}, status=exc.status)
    for name, value in exc.headers.items():
        response[name] = value
    return response


def stream_response(content: Any) -> StreamingHttpResponse:
    """A server-sent events response relaying ``content`` (a ``Relay`` or ``AsyncRelay``)."""
    response = StreamingHttpResponse(content, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


def _sent(upstream: Upstream, call: str, body: dict[str, Any], path: str) -> Any:
    """``upstream.<call>(body)``, with the path for APIs besides chat only, so an
    ``UPSTREAM`` class written for chat alone keeps working."""
    method = getattr(upstream, call)
    return method(body) if path == CHAT_PATH else method(body, path=path)


def as_openai(response: HttpResponseBase) -> HttpResponseBase:
    """Answers are made in OpenAI's shape: nothing to change."""
    return response


class GatedCall:
    """An admitted call: the upstream's body, and the answer to each way the call ends.

    ``shaped`` rewrites each answer into its API's shape (``drf.anthropic.anthropic_answer``
    for ``/v1/messages``); answers are made in OpenAI's."""

    def __init__(
        self,
        request: ShapeRequest,
        guard: QuotaGuard,
        user: Any,
        shaped: Callable[[HttpResponseBase], HttpResponseBase] = as_openai,
    ) -> None:
        self.request = request
        self.guard = guard
        self.user = user
        self.shaped = shaped

    def upstream_body(self) -> dict[str, Any]:
        """The body for the upstream, with the reserved cap under the field the price row
        names; a failure to build it is an ``APIException``, so
        the admitted call answers it in OpenAI's shape (after its release)."""
        try:
            estimate = self.guard.reservation.estimate
            cap_field = estimate.price.output_cap_field if estimate is not None else ""
            return self.request.upstream_body(self.guard.max_tokens, cap_field)
        except RecursionError as exc:  # ``json_limits`` bounds nesting: a second line
            raise InvalidRequest(
                "The request body is nested too deeply.", code="nesting_too_deep"
            ) from exc
        except Exception as exc:
            logger.exception("could not build the upstream body for %s", self.request.model)
            raise APIException(
                "The gateway could not build the upstream request.", code="gateway_error"
            ) from exc

    def refused(self, exc: APIException) -> HttpResponseBase:
        """The answer to a call that failed before reaching the upstream (released)."""
        response = response_for_exception(exc)
        assert response is not None  # an APIException always has one
        return self.headed(response)

    def failed(self, exc: UpstreamError) -> HttpResponseBase:
        """The answer to a call the upstream refused or failed (its reservation ended)."""
        logger.warning("upstream refused %s for user %s: %s", self.request.model, self.user.pk, exc)
        return self.headed(upstream_error_response(exc))

    def streamed(self, relay: Relay | AsyncRelay) -> HttpResponseBase:
        return self.headed(stream_response(relay))

    def completed(self, completion: dict[str, Any]) -> HttpResponseBase:
        return self.headed(JsonResponse(completion))

    def headed(self, response: HttpResponseBase) -> HttpResponseBase:
        """Every answer to an admitted call carries its rate-limit headers."""
        for name, value in admission_headers(self.guard).items():
            response[name] = value
        return self.shaped(response)

    def answer(self) -> HttpResponseBase:
        """Send the call upstream and answer it, on the guard's sync methods."""
        request, guard = self.request, self.guard
        try:  # nothing is sent yet: any failure here releases
            upstream, body = get_upstream(request.path), self.upstream_body()
            hand_back()  # a pooled database connection is not held while the LLM writes
        except APIException as exc:
            guard.release()
            return self.refused(exc)
        except BaseException:
            guard.release()
            raise
        try:
            reply = _sent(upstream, "stream" if request.stream else "complete", body, request.path)
        except UpstreamError as exc:
            if billed_nothing(exc):
                guard.release()
            else:
                guard.charge_estimate()
            return self.failed(exc)
        except BaseException as exc:
            guard.fail(exc)  # the release rule: released only if provably unbilled
            raise
        try:
            if request.stream:
                stream = cast(UpstreamStream, reply)
                return self.streamed(Relay(stream, guard, request.watch()))
            completion = cast(dict[str, Any], reply)
            settle(guard, request.read(completion))
            return self.completed(completion)
        except BaseException:
            if not guard.finished:
                guard.charge_estimate()  # the call ran: never charged nothing
            raise

    async def aanswer(self) -> HttpResponseBase:
        """``answer`` for the async view: nothing waits in a thread."""
        request, guard = self.request, self.guard
        try:  # nothing is sent yet: any failure here releases
            upstream, body = get_upstream(request.path), self.upstream_body()
            await ahand_back()  # nor here, where the ORM ran in the request's sync thread
        except APIException as exc:
            await asyncio.shield(guard.arelease())
            return self.refused(exc)
        except BaseException:
            await asyncio.shield(guard.arelease())
            raise
        try:
            call = "astream" if request.stream else "acomplete"
            reply = await _sent(upstream, call, body, request.path)
        except UpstreamError as exc:
            ending = guard.arelease() if billed_nothing(exc) else guard.acharge_estimate()
            await asyncio.shield(ending)
            return self.failed(exc)
        except BaseException as exc:
            # The release rule: a client that left while the upstream worked on the
            # answer (CancelledError), like any failure that proves nothing, is charged
            # the estimate: it may all have been generated.
            await asyncio.shield(guard.afail(exc))
            raise
        if request.stream:
            stream = cast(AsyncUpstreamStream, reply)
            return self.streamed(AsyncRelay(stream, guard, request.watch()))
        completion = cast(dict[str, Any], reply)
        try:
            # Shielded: a client leaving now cannot undo the charge of an answer received.
            await asyncio.shield(asettle(guard, request.read(completion)))
            return self.completed(completion)
        except Exception:
            if not guard.finished:
                await asyncio.shield(guard.acharge_estimate())  # the call ran
            raise
