"""The release rule (``llm_quota.quota.release_rule``): a call that ends without a
settle is released (charged 0) only where its ending shows that the upstream billed
nothing; otherwise it is charged the estimate. A billed call is never charged 0.

Every way of ending (``release_rule_urls``: real SDK calls against the tests' own
upstream, a closed port, the quota's refusals, answers a view returns) through every
adapter: ``quota_guard`` (sync and async), ``@quota_gated`` (sync and async views) and
``LLMQuotaThrottle`` with ``LLMQuotaMiddleware`` (under WSGI and ASGI). Real Redis.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.test import AsyncClient, Client

from llm_quota import quota_guard
from llm_quota.rules.estimation import count_messages
from tests.integration import release_rule_urls as endings
from tests.support import factories
from tests.support.fake_upstream import UpstreamServer
from tests.support.gateway import MSGS, access_token

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.integration.release_rule_urls")]
#: Async code reads the ORM in other threads, which only see committed rows.
committed = pytest.mark.django_db(transaction=True)

BODY = {"model": "gpt-4o", "messages": MSGS, "max_tokens": 20}
GUARDED = {"model": "gpt-4o", "prompt_tokens": 10, "max_tokens": 20}  # 10 + 20 x 4 = 90
RAISED = [
    pytest.param(ending, outcome, id=ending.__name__) for ending, outcome in endings.RAISED.items()
]
ANSWERED = [
    pytest.param(name, outcome, id=name) for name, (_, _, outcome) in endings.ANSWERED.items()
]
#: The async adapters share the sync ones' decisions (``QuotaGuard.fail``,
#: ``decorators.ending``): one of each kind shows the async wiring reaches them.
SOME_RAISED = [
    param
    for param in RAISED
    if param.id in ("provider_error", "never_connected", "read_timeout", "bug_after_the_answer")
]
SOME_ANSWERED = [param for param in ANSWERED if param.id in ("usage", "upstream_down", "broke")]


@pytest.fixture(scope="module", autouse=True)
def upstream():
    server = UpstreamServer().start()
    endings.UPSTREAM, unset = server.url, endings.UPSTREAM
    yield server
    endings.UPSTREAM = unset
    server.stop()


@pytest.fixture
def user(ledger):
    factories.price("gpt-4o", "1", "4")
    factories.tier("free", is_default=True, requests_per_minute=50)
    return factories.user()


def charged(ledger, user) -> int:
    """What the call cost, once nothing of it is held any more."""
    usage = ledger.usage(user.pk)
    assert usage.reserved == 0 and usage.in_flight == 0
    assert usage.requests_this_minute == 1  # it was admitted
    return usage.tokens_this_month


def expected(outcome: str, estimate: int) -> int:
    usage = endings.USAGE
    return {
        "released": 0,
        "charged": estimate,
        "settled": usage["prompt_tokens"] + 4 * usage["completion_tokens"],
    }[outcome]


# -- quota_guard ---------------------------------------------------------------------------


@pytest.mark.parametrize("ending, outcome", RAISED)
def test_guard_ends_a_call_that_raised_by_the_release_rule(user, ledger, ending, outcome):
    with pytest.raises(Exception) as raised:
        with quota_guard(user, **GUARDED):
            ending()
    assert not isinstance(raised.value, AssertionError)
    assert charged(ledger, user) == expected(outcome, 90)


@committed
@pytest.mark.parametrize("ending, outcome", SOME_RAISED)
def test_async_guard_ends_a_call_that_raised_by_the_release_rule(user, ledger, ending, outcome):
    async def main():
        try:
            async with quota_guard(user, **GUARDED):
                await sync_to_async(ending, thread_sensitive=False)()
        except Exception:
            pass
        finally:
            await sync_to_async(connections.close_all)()  # as an ASGI request's end does

    asyncio.run(main())
    assert charged(ledger, user) == expected(outcome, 90)


@committed
def test_a_client_leaving_an_async_guarded_call_is_charged_the_estimate(user, ledger):
    """Cancelled mid-call (the client went away): the upstream may finish and bill."""

    async def main():
        async def call():
            async with quota_guard(user, **GUARDED):
                await asyncio.sleep(10)  # the upstream call

        task = asyncio.create_task(call())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await sync_to_async(connections.close_all)()

    asyncio.run(main())
    assert charged(ledger, user) == 90


def test_an_explicit_release_is_the_callers_word(user, ledger):
    with pytest.raises(KeyError):
        with quota_guard(user, **GUARDED) as quota:
            quota.release()  # the caller knows: nothing was sent
            raise KeyError("prompt")
    assert charged(ledger, user) == 0


# -- @quota_gated and the throttle with the middleware -----------------------------------------


def post(path: str, user, *, asgi: bool = False):
    headers = {"Authorization": f"Bearer {access_token(user)}"}
    data = json.dumps(BODY)
    if not asgi:
        return Client(raise_request_exception=False).post(
            path, data, content_type="application/json", headers=headers
        )

    async def main():
        try:
            client = AsyncClient(raise_request_exception=False)
            return await client.post(path, data, content_type="application/json", headers=headers)
        finally:
            await sync_to_async(connections.close_all)()

    return asyncio.run(main())


def view_estimate() -> int:
    return count_messages(MSGS, "gpt-4o") + 20 * 4


SYNC_ADAPTERS = [
    pytest.param("/plain/", id="quota_gated"),
    pytest.param("/drf/", id="throttle+middleware"),
]
ASYNC_ADAPTERS = [
    pytest.param("/aplain/", id="quota_gated-async"),
    pytest.param("/drf/", id="throttle+middleware-asgi"),
]


def raised(prefix, user, ledger, ending, outcome, *, asgi=False) -> None:
    response = post(prefix + ending.__name__, user, asgi=asgi)
    assert response.status_code >= 400
    assert charged(ledger, user) == expected(outcome, view_estimate())


def answered(prefix, user, ledger, answer, outcome, *, asgi=False) -> None:
    response = post(prefix + answer, user, asgi=asgi)
    assert response.status_code == endings.ANSWERED[answer][0]
    assert charged(ledger, user) == expected(outcome, view_estimate())


@pytest.mark.parametrize("prefix", SYNC_ADAPTERS)
@pytest.mark.parametrize("ending, outcome", RAISED)
def test_a_view_that_raised_is_ended_by_the_release_rule(user, ledger, prefix, ending, outcome):
    raised(prefix, user, ledger, ending, outcome)


@pytest.mark.parametrize("prefix", SYNC_ADAPTERS)
@pytest.mark.parametrize("answer, outcome", ANSWERED)
def test_a_views_own_answer_is_ended_by_the_release_rule(user, ledger, prefix, answer, outcome):
    answered(prefix, user, ledger, answer, outcome)


@committed
@pytest.mark.parametrize("prefix", ASYNC_ADAPTERS)
@pytest.mark.parametrize("ending, outcome", SOME_RAISED)
def test_an_async_view_that_raised_is_ended_by_the_release_rule(
    user, ledger, prefix, ending, outcome
):
    raised(prefix, user, ledger, ending, outcome, asgi=True)


@committed
@pytest.mark.parametrize("prefix", ASYNC_ADAPTERS)
@pytest.mark.parametrize("answer, outcome", SOME_ANSWERED)
def test_an_async_views_own_answer_is_ended_by_the_release_rule(
    user, ledger, prefix, answer, outcome
):
    answered(prefix, user, ledger, answer, outcome, asgi=True)
