"""The async gateway view (``async_gateway``), through Django's AsyncClient and its ASGI
handler: the same answers as the DRF view for the same requests, no sync Redis command
on the event loop, and every reservation ended exactly once, however the call ends."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
import redis
from asgiref.sync import iscoroutinefunction, sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.core.handlers.asgi import ASGIHandler
from django.http import JsonResponse
from django.test import AsyncClient, Client, RequestFactory, override_settings

from llm_quota.decorators import quota_gated
from llm_quota.gateway.async_views import AsyncChatCompletionsView
from llm_quota.gateway.relay import AsyncRelay
from llm_quota.gateway.urls import chat_completions_view
from llm_quota.ledger.async_driver import AsyncLedger
from llm_quota.ledger.default import set_default_ledger
from llm_quota.ledger.sync_driver import Ledger
from llm_quota.middleware import LLMQuotaMiddleware
from llm_quota.quota import admission
from llm_quota.quota.guard import QuotaGuard
from llm_quota.rules.estimation import count_output
from llm_quota.shapes.chat import StreamWatch
from tests.support import factories, fake_upstream
from tests.support.fake_upstream import WORDS
from tests.support.gateway import MSGS, access_token
from tests.system.test_async_ledger import run_with_orm

pytestmark = pytest.mark.django_db(transaction=True)

ASYNC_URLS = "tests.integration.gateway.async_gateway_urls"
URL = "/v1/chat/completions"
BODY = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20}


@pytest.fixture
def prices():
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=200)
    factories.price("up-*", "1", "2", default_max_output_tokens=100)


@pytest.fixture
def free(prices):
    return factories.tier("free", is_default=True, requests_per_minute=50)


@pytest.fixture
def user(ledger, free):
    return factories.user()


def _payload(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def _auth(user) -> dict[str, str]:
    return {} if user is None else {"Authorization": f"Bearer {access_token(user)}"}


def sync_post(body, headers: dict[str, str]):
    """The DRF view (the project's URLs), its streamed body read and closed."""
    client = Client(raise_request_exception=False)
    response = client.post(URL, _payload(body), content_type="application/json", headers=headers)
    if response.streaming:
        response.body = b"".join(response.streaming_content)
    else:
        response.body = response.content
    return response


def async_post(body, headers: dict[str, str]):
    """The async view, through Django's AsyncClient on an event loop of its own."""

    async def main():
        client = AsyncClient(raise_request_exception=False)
        response = await client.post(
            URL, _payload(body), content_type="application/json", headers=headers
        )
        if response.streaming:
            response.body = b"".join([part async for part in response.streaming_content])
        else:
            response.body = response.content
        return response

    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        return run_with_orm(main)


def events(body: bytes) -> list:
    """The SSE payloads, JSON decoded, without the per-call ``created`` time."""
    found = []
    for line in body.decode().splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            if data != "[DONE]":
                data = json.loads(data)
                data.pop("created", None)
            found.append(data)
    return found


def same_answer(sync, async_) -> None:
    assert async_.status_code == sync.status_code
    assert dict(async_.headers) == dict(sync.headers)
    if sync.headers["Content-Type"] == "text/event-stream":
        assert events(async_.body) == events(sync.body)
    else:
        as_json = [json.loads(r.body) for r in (sync, async_)]
        for data in as_json:
            data.pop("created", None)
        assert as_json[1] == as_json[0]


def nothing_held(ledger, user) -> None:
    live = ledger.usage(user.pk)
    assert live.reserved == 0 and live.in_flight == 0


# -- the same answers as the DRF view ---------------------------------------------------


def test_chat_url_is_the_async_view_when_the_setting_says_so(settings):
    assert not iscoroutinefunction(chat_completions_view())
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "ASYNC_GATEWAY": True}
    view = chat_completions_view()
    assert iscoroutinefunction(view) and view.view_class is AsyncChatCompletionsView


def test_a_non_boolean_async_gateway_setting_fails_the_system_check(settings):
    from llm_quota.checks import check_gateway

    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "ASYNC_GATEWAY": "yes"}
    assert "llm_quota.E015" in {error.id for error in check_gateway()}


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_admitted_calls_are_answered_and_charged_as_the_sync_view_does(
    ledger, free, sync_io_on_loop, stream
):
    # Each view's own user on the same tier, at the same (pinned) instant: the same
    # counters, so the same rate-limit headers.
    by_sync, by_async = factories.user(), factories.user()
    body = {**BODY, "stream": stream}
    sync, async_ = sync_post(body, _auth(by_sync)), async_post(body, _auth(by_async))
    assert async_.status_code == 200 and async_["x-ratelimit-remaining-requests"] == "49"
    same_answer(sync, async_)
    charged = [ledger.usage(u.pk).by_model for u in (by_sync, by_async)]
    assert charged[1] == charged[0] and charged[1][0].requests == 1
    nothing_held(ledger, by_async)
    assert sync_io_on_loop == []  # every Redis command of the async view was awaited


@pytest.mark.parametrize(
    "limits",
    [{"requests_per_minute": 1}, {"tokens_per_month": 5}],
    ids=["rate_limited", "budget_exceeded"],
)
def test_refusals_carry_the_sync_views_status_headers_and_body(ledger, prices, limits):
    pro = factories.tier("pro")
    poor = factories.tier("poor", upgrade_to=pro, **limits)
    by_sync, by_async = factories.user(poor), factories.user(poor)
    if "requests_per_minute" in limits:  # the first call of the minute goes through
        assert sync_post(BODY, _auth(by_sync)).status_code == 200
        assert async_post(BODY, _auth(by_async)).status_code == 200
    sync, async_ = sync_post(BODY, _auth(by_sync)), async_post(BODY, _auth(by_async))
    assert async_.status_code == 429 and int(async_["Retry-After"]) >= 1
    same_answer(sync, async_)
    error = json.loads(async_.body)["error"]
    assert error["limit"] == next(iter(limits))
    if "tokens_per_month" in limits:
        assert async_["x-should-retry"] == "false"
        assert error["type"] == "insufficient_quota" and error["upgrade"]["tier"] == "pro"
    else:
        assert async_["x-ratelimit-remaining-requests"] == "0"
    nothing_held(ledger, by_async)


def _out_of_scope_user():
    return factories.user(factories.tier("reader", scopes="usage:read"))


@pytest.mark.parametrize(
    "body, who",
    [
        (b"{", "user"),
        (b"", "user"),
        (b"[]", "user"),
        ({"model": "gpt-4o"}, "user"),
        ({"model": "gpt-4o", "messages": "nope"}, "user"),
        ({**BODY, "max_tokens": 0}, "user"),
        ({**BODY, "stream": "yes"}, "user"),
        ({**BODY, "model": "no-such-model"}, "user"),
        (BODY, "nobody"),
        (BODY, "bad token"),
        (BODY, "out of scope"),
    ],
)
def test_bad_requests_get_the_sync_views_answer_and_reserve_nothing(ledger, user, body, who):
    headers = {
        "user": lambda: _auth(user),
        "nobody": lambda: {},
        "bad token": lambda: {"Authorization": "Bearer not-a-jwt"},
        "out of scope": lambda: _auth(_out_of_scope_user()),
    }[who]()
    sync, async_ = sync_post(body, headers), async_post(body, headers)
    assert async_.status_code in (400, 401, 403)
    same_answer(sync, async_)
    assert set(json.loads(async_.body)["error"]) >= {"message", "type", "code", "param"}
    live = ledger.usage(user.pk)
    assert live.requests_this_minute == 0 and live.reserved == 0


def test_redis_down_with_fail_open_off_is_the_sync_views_503(settings, quota_prefix, free):
    user = factories.user()
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "FAIL_OPEN": False}  # (reset on teardown)
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    set_default_ledger(Ledger(dead, prefix=quota_prefix))
    sync, async_ = sync_post(BODY, _auth(user)), async_post(BODY, _auth(user))
    assert async_.status_code == 503 and int(async_["Retry-After"]) >= 1
    assert json.loads(async_.body)["error"]["code"] == "quota_unavailable"
    same_answer(sync, async_)


def test_other_methods_are_405_in_openai_shape(ledger, user):
    headers = _auth(user)

    async def main():
        return await AsyncClient().get(URL, headers=headers)

    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        response = run_with_orm(main)
    assert response.status_code == 405 and response["Allow"] == "POST, OPTIONS"
    assert response.json()["error"]["code"] == "method_not_allowed"


# -- a real upstream: failures, streams, disconnects -----------------------------------
# ``upstream`` comes before ``ledger``: it changes LLM_QUOTA, which drops the default
# ledger, and the pinned one must be the ledger both views use.


@pytest.mark.parametrize("model", ["up-500", "up-429"])
@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_upstream_refusal_is_passed_on_like_the_sync_view_and_released(
    upstream, ledger, free, model, stream
):
    by_sync, by_async = factories.user(), factories.user()
    body = {**BODY, "model": model, "stream": stream}
    sync, async_ = sync_post(body, _auth(by_sync)), async_post(body, _auth(by_async))
    assert async_.status_code == int(model[3:])
    same_answer(sync, async_)
    live = ledger.usage(by_async.pk)
    assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


@pytest.mark.parametrize("model", ["up-normal", "up-no-usage", "up-ignores-cap"])
def test_completions_are_settled_as_the_sync_view_settles_them(upstream, ledger, free, model):
    """From the reported usage, else from the counted output."""
    by_sync, by_async = factories.user(), factories.user()
    body = {**BODY, "model": model, "max_tokens": 30}
    sync, async_ = sync_post(body, _auth(by_sync)), async_post(body, _auth(by_async))
    assert async_.status_code == 200
    same_answer(sync, async_)
    charged = [ledger.usage(u.pk).by_model for u in (by_sync, by_async)]
    assert charged[1] == charged[0] and charged[1][0].output_tokens >= 30
    nothing_held(ledger, by_async)


def test_unreachable_upstream_is_the_sync_views_502_and_releases(upstream, ledger, free):
    upstream.stop()
    by_sync, by_async = factories.user(), factories.user()
    sync, async_ = (
        sync_post(BODY | {"model": "up-normal"}, _auth(by_sync)),
        async_post(BODY | {"model": "up-normal"}, _auth(by_async)),
    )
    assert async_.status_code == 502
    assert json.loads(async_.body)["error"]["code"] == "upstream_unreachable"
    assert async_.headers.keys() == sync.headers.keys()
    live = ledger.usage(by_async.pk)
    assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_without_an_upstream_both_views_answer_502_and_release(settings, ledger, free, stream):
    """No UPSTREAM and no OPENAI_BASE_URL: never an invented answer."""
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM": None, "OPENAI_BASE_URL": None}
    by_sync, by_async = factories.user(), factories.user()
    body = {**BODY, "stream": stream}
    sync, async_ = sync_post(body, _auth(by_sync)), async_post(body, _auth(by_async))
    assert async_.status_code == 502
    assert json.loads(async_.body)["error"]["code"] == "upstream_not_configured"
    same_answer(sync, async_)
    for user in (by_sync, by_async):
        live = ledger.usage(user.pk)
        assert live.tokens_this_month == 0 and live.reserved == 0 and live.in_flight == 0


@pytest.mark.parametrize("model", ["up-normal", "up-no-usage", "up-ignores-cap", "up-drop"])
def test_streams_are_settled_as_the_sync_view_settles_them(upstream, ledger, free, model):
    """From the usage chunk; from the streamed text without one; from what was sent
    when the upstream drops the connection (the client then gets an error event)."""
    by_sync, by_async = factories.user(), factories.user()
    body = {**BODY, "model": model, "stream": True, "max_tokens": 30}
    sync, async_ = sync_post(body, _auth(by_sync)), async_post(body, _auth(by_async))
    assert async_.status_code == sync.status_code == 200
    charged = [ledger.usage(u.pk).by_model for u in (by_sync, by_async)]
    assert charged[1] == charged[0] and charged[1][0].output_tokens > 0
    nothing_held(ledger, by_async)
    last = events(async_.body)[-1]
    if model == "up-drop":
        assert last["error"]["code"] == "upstream_dropped"
        assert charged[1][0].output_tokens == fake_upstream.DROP_AFTER
    else:
        assert last == "[DONE]" and events(async_.body)[:-1] == events(sync.body)[:-1]


def _asgi_scope(headers: dict[str, str], body: bytes) -> dict:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": URL, "raw_path": URL.encode(), "root_path": "",
        "query_string": b"", "headers": raw, "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }  # fmt: skip


@pytest.fixture
def settle_calls(monkeypatch):
    """Every settle that reaches the gate, in order."""
    calls = []
    real = admission.settle_plan

    def counted(reservation, usage, **options):
        calls.append(reservation.id)
        return real(reservation, usage, **options)

    monkeypatch.setattr(admission, "settle_plan", counted)
    return calls


def test_client_leaving_mid_stream_is_charged_what_was_generated_once(
    upstream, ledger, user, settle_calls, settings
):
    """Through Django's ASGI handler, as uvicorn drives it: the client's
    ``http.disconnect`` cancels the request while the relay awaits the upstream."""
    settings.ROOT_URLCONF = ASYNC_URLS
    body = json.dumps({**BODY, "model": "up-trickle", "max_tokens": WORDS, "stream": True})
    scope = _asgi_scope(_auth(user), body.encode())

    async def main():
        app = ASGIHandler()
        client = ApplicationCommunicator(app, scope)
        await client.send_input({"type": "http.request", "body": body.encode()})
        start = await client.receive_output(10)
        assert start["type"] == "http.response.start" and start["status"] == 200
        received = 0
        while received < 3:
            message = await client.receive_output(10)
            received += message.get("body", b"").count(b"data: ")
        await client.send_input({"type": "http.disconnect"})
        await client.wait(10)
        return received

    received = run_with_orm(main)
    nothing_held(ledger, user)
    used = ledger.usage(user.pk).by_model[0]
    assert received <= used.output_tokens <= upstream.sent["up-trickle"] < WORDS
    assert used.requests == 1 and len(settle_calls) == 1


# -- AsyncRelay on its own: the endings no client can time -------------------------------


class Scripted:
    """An upstream stream of the given payloads that stops before ``pause_at`` until
    ``proceed`` is set, and records whether it was closed."""

    def __init__(self, payloads: list[str], pause_at: int | None = None) -> None:
        self.payloads = payloads
        self.pause_at = pause_at
        self.proceed = asyncio.Event()
        self.closed = False

    async def __aiter__(self):
        for index, data in enumerate(self.payloads):
            if index == self.pause_at:
                await self.proceed.wait()
            yield data

    async def aclose(self) -> None:
        self.closed = True


def _chunk(text: str) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": text}}]})


PAYLOADS = [_chunk("hello"), _chunk(" world"), "[DONE]"]
PROMPT = 10


async def _relay(user, stream) -> AsyncRelay:
    guard = QuotaGuard(user.pk, model="gpt-4o", prompt_tokens=PROMPT, max_tokens=50)
    await guard.aadmit()
    return AsyncRelay(stream, guard, StreamWatch(include_usage=False))


def _charged(ledger, user, text: str) -> None:
    nothing_held(ledger, user)
    assert ledger.usage(user.pk).tokens_this_month == PROMPT + 4 * count_output(text, "gpt-4o")


def test_relay_closed_by_django_while_waiting_at_a_yield_settles_what_was_sent(
    ledger, user, settle_calls
):
    """Under ASGI, Django calls ``response.close()`` in a thread once the response is
    over; a relay suspended between two events learns of the disconnect only so."""

    async def main():
        stream = Scripted(PAYLOADS)
        relay = await _relay(user, stream)
        events = relay.__aiter__()
        first = await events.__anext__()
        await sync_to_async(relay.close)()
        # Checked here: when the loop shuts down it closes suspended generators itself.
        assert b"hello" in first and stream.closed and relay.guard.finished

    run_with_orm(main)
    _charged(ledger, user, "hello")
    assert len(settle_calls) == 1


def test_relay_never_read_is_settled_when_django_closes_it(ledger, user, settle_calls):
    async def main():
        stream = Scripted(PAYLOADS)
        relay = await _relay(user, stream)
        await sync_to_async(relay.close)()  # the client left before the first byte
        assert stream.closed and relay.guard.finished

    run_with_orm(main)
    _charged(ledger, user, "")
    assert len(settle_calls) == 1


def test_relay_dropped_unread_and_unclosed_is_settled_once_it_is_garbage(
    ledger, user, settle_calls
):
    """A client leaving before Django began to send the response: Django then neither
    reads the body nor closes it."""

    async def main():
        stream = Scripted(PAYLOADS)
        relay = await _relay(user, stream)
        guard = relay.guard
        del relay
        gc.collect()
        for _ in range(500):  # the ending was scheduled on this loop: let it run
            if guard.finished and stream.closed:
                break
            await asyncio.sleep(0.002)
        assert stream.closed and guard.finished

    run_with_orm(main)
    _charged(ledger, user, "")
    assert len(settle_calls) == 1


def test_relay_settle_survives_a_second_cancellation(ledger, user, monkeypatch):
    """The client leaves while the relay awaits the upstream, and the request's task is
    cancelled again while the settle is in flight: the shielded settle still lands."""
    started, finish = [], None
    real = AsyncLedger.perform

    async def slow(self, step):  # Redis takes its time over the settle
        if getattr(step, "script", None) == "settle":
            started[0].set()
            await finish.wait()
        return await real(self, step)

    monkeypatch.setattr(AsyncLedger, "perform", slow)

    async def main():
        nonlocal finish
        started.append(asyncio.Event())
        finish = asyncio.Event()
        stream = Scripted(PAYLOADS, pause_at=1)
        relay = await _relay(user, stream)

        async def consume():
            return [event async for event in relay]

        task = asyncio.create_task(consume())
        while not relay.watch.output.text:
            await asyncio.sleep(0)  # the first event has passed; now it awaits the upstream
        task.cancel()
        await started[0].wait()
        task.cancel()  # a second cancellation, mid-settle
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not relay.guard.finished
        finish.set()
        await relay._ending.future
        return stream, relay

    stream, relay = run_with_orm(main)
    assert stream.closed and relay.guard.finished
    _charged(ledger, user, "hello")


# -- the middleware and @quota_gated in async mode -------------------------------------


def test_middleware_runs_as_a_coroutine_under_asgi():
    async def get_response(request):
        return None

    assert iscoroutinefunction(LLMQuotaMiddleware(get_response))
    assert not iscoroutinefunction(LLMQuotaMiddleware(lambda request: None))


def test_async_gated_view_is_priced_by_its_own_quota_request(ledger, user, prices):
    seen = []

    def priced(request):
        seen.append(request.path)
        return {"model": "gpt-4o", "prompt_tokens": 5, "max_tokens": 10}

    @quota_gated(quota_request=priced)
    async def view(request):
        return JsonResponse({"max_tokens": request.llm_quota.max_tokens})

    request = RequestFactory().post("/aplain", headers=_auth(user))

    async def main():
        return await view(request)

    response = run_with_orm(main)
    assert seen == ["/aplain"] and json.loads(response.content) == {"max_tokens": 10}
    assert ledger.usage(user.pk).tokens_this_month == 5 + 10 * 4  # no usage: the estimate
    nothing_held(ledger, user)


def test_async_middleware_gates_async_plain_views(ledger, user, prices, sync_io_on_loop):
    poor = factories.user(factories.tier("poor", tokens_per_day=10))
    allowed, short = _auth(user), _auth(poor)

    async def main():
        client = AsyncClient(raise_request_exception=False)
        data = json.dumps(BODY)
        ok = await client.post("/aplain", data, content_type="application/json", headers=allowed)
        refused = await client.post("/aplain", data, content_type="application/json", headers=short)
        return ok, refused

    with override_settings(ROOT_URLCONF=ASYNC_URLS):
        ok, refused = run_with_orm(main)
    assert ok.status_code == 200 and ok.json()["max_tokens"] == 20
    assert ok["x-ratelimit-remaining-requests"] == "49"
    assert ledger.usage(user.pk).tokens_this_month == 5 + 3 * 4  # pipeline_urls.USAGE
    nothing_held(ledger, user)
    assert refused.status_code == 429 and refused["x-should-retry"] == "false"
    assert sync_io_on_loop == []
