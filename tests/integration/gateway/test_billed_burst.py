"""Issue 12's "done when": 64 requests at once, each carrying 5-10k tokens of
``functions``, ``response_format`` or images, through the gateway to an
upstream that bills like OpenAI (``OracleServer``). What the user is charged is what the
upstream billed, it never passes the budget, and nothing is left reserved."""

from __future__ import annotations

import asyncio
import json
import random
import threading

import pytest
from django.db import connections
from django.test import AsyncClient, Client, override_settings
from rest_framework_simplejwt.authentication import JWTAuthentication

from llm_quota.models import ModelPrice
from llm_quota.rules.policy import policy_for
from llm_quota.rules.pricing import price_for
from llm_quota.testing import billing
from tests.support import factories, media
from tests.support.gateway import access_token
from tests.system.test_async_ledger import run_with_orm

pytestmark = pytest.mark.django_db(transaction=True)

BURST = 64
LIMIT = 100_000
CAP = 50
WORDS = (
    "account address amount balance billing budget calendar customer date delivery "
    "discount invoice item language limit location order payment period price product "
    "quantity record region report schedule shipment status summary tax timezone total"
).split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def _properties(rng: random.Random, count: int) -> dict:
    return {
        f"field_{n}": {"type": rng.choice(["string", "integer", "boolean"]),
                       "description": _text(rng, 25)}
        for n in range(count)
    }  # fmt: skip


def heavy_functions(rng: random.Random) -> list[dict]:
    """About 7k tokens of function definitions."""
    return [
        {"name": f"fn_{n}", "description": _text(rng, 60),
         "parameters": {"type": "object", "properties": _properties(rng, 4)}}
        for n in range(28)
    ]  # fmt: skip


def heavy_schema(rng: random.Random) -> dict:
    """About 7k tokens of structured-output schema."""
    return {
        "type": "json_schema",
        "json_schema": {"name": "report", "strict": True, "schema": {
            "type": "object", "properties": _properties(rng, 150),
            "required": [], "additionalProperties": False}},
    }  # fmt: skip


def body_for(index: int) -> dict:
    """Each request carries 5-10k tokens of one billed field the old estimate skipped or
    underrated: functions, a response schema, a high-detail image."""
    rng = random.Random(index)
    message = {"role": "user", "content": f"Request {index}: answer briefly."}
    body = {"model": "gpt-4o", "messages": [message], "max_tokens": CAP}
    kind = index % 3
    if kind == 0:
        body["functions"] = heavy_functions(rng)
    elif kind == 1:
        body["response_format"] = heavy_schema(rng)
    else:  # gpt-4o-mini bills 2833 + 5667 per tile: one 512px tile is 8.5k tokens
        image = media.image_part(media.data_url(media.png(512, 512, padding=2_000)))
        body["model"] = "gpt-4o-mini"
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                                         image]}]  # fmt: skip
    return body


def test_every_burst_body_carries_5_to_10k_billed_tokens():
    for index in range(6):
        body = body_for(index)
        plain = {**body, "messages": [{"role": "user", "content": "x"}]}
        for name in ("functions", "response_format"):
            plain.pop(name, None)
        extra = billing.prompt_tokens(body) - billing.prompt_tokens(plain)
        assert 5_000 <= extra <= 10_000, (index, extra)


@pytest.fixture
def priced_user(gateway):
    # Both models at 1 base token per input token and 4 per output token.
    ModelPrice.objects.filter(model__in=["gpt-4o", "gpt-4o-mini"]).update(
        input_multiplier=1, output_multiplier=4, context_window=128_000
    )
    factories.tier("free", is_default=True, tokens_per_month=LIMIT)
    return factories.user()


def charged_by(oracle) -> int:
    """What the upstream billed the admitted calls, in base tokens (1 in, 4 out)."""
    return sum(usage["prompt_tokens"] + 4 * usage["completion_tokens"] for _, usage in oracle.bills)


def check_the_books(gateway, oracle, user, statuses) -> None:
    live = gateway.usage(user)
    assert live.reserved == 0 and live.in_flight == 0
    assert oracle.refusals == []
    assert set(statuses) <= {200, 429}
    # Charged exactly what the upstream billed, and that stays inside the budget.
    assert live.tokens_this_month == charged_by(oracle)
    assert live.tokens_this_month <= LIMIT
    # The budget was contended: some calls went through, most were refused.
    assert statuses.count(200) >= 2 and statuses.count(429) >= BURST // 2


@pytest.fixture
def few_database_connections(monkeypatch, priced_user):
    """64 threads would hold 64 connections to the shared PostgreSQL (bounding them is
    issue 12's item 6, not this test's): each thread reads its user, the only query a
    warm gateway makes, a few at a time on a connection it closes at once."""
    policy_for(priced_user), price_for("gpt-4o"), price_for("gpt-4o-mini")  # warm caches
    slots = threading.Semaphore(8)
    read_user = JWTAuthentication.get_user

    def get_user(self, token):
        with slots:
            try:
                return read_user(self, token)
            finally:
                connections.close_all()

    monkeypatch.setattr(JWTAuthentication, "get_user", get_user)


def test_a_64_way_burst_of_heavy_bodies_never_passes_the_budget(
    gateway, oracle, priced_user, few_database_connections
):
    """The DRF view in 64 threads at once (Django's test client: the live server's listen
    backlog would turn connections away, and a retried call could be billed twice)."""
    headers = {"Authorization": f"Bearer {access_token(priced_user)}"}
    start = threading.Barrier(BURST)
    statuses: list[int] = []

    def call(index: int) -> None:
        payload = json.dumps(body_for(index))
        try:
            start.wait()
            response = Client(raise_request_exception=False).post(
                "/v1/chat/completions", payload, content_type="application/json", headers=headers
            )
            statuses.append(response.status_code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(statuses) == BURST
    check_the_books(gateway, oracle, priced_user, statuses)


def test_the_async_view_holds_the_budget_in_the_same_burst(gateway, oracle, priced_user):
    headers = {"Authorization": f"Bearer {access_token(priced_user)}"}

    async def main() -> list[int]:
        client = AsyncClient(raise_request_exception=False)
        responses = await asyncio.gather(*(
            client.post("/v1/chat/completions", json.dumps(body_for(i)),
                        content_type="application/json", headers=headers)
            for i in range(BURST)
        ))  # fmt: skip
        return [response.status_code for response in responses]

    with override_settings(ROOT_URLCONF="tests.integration.gateway.async_gateway_urls"):
        statuses = run_with_orm(main)
    check_the_books(gateway, oracle, priced_user, statuses)
