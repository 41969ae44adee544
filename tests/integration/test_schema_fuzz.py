"""schemathesis over the project's own OpenAPI schema: zero 5xx, zero leaked reservations.

Every operation (token endpoints, usage API, gateway) gets generated bodies, query
strings and path parameters, valid and not, as a user whose tier allows every model.
"""

from __future__ import annotations

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from llm_quota.contrib.jwt.tokens import ScopedTokenObtainPairSerializer
from llm_quota.ledger.default import get_ledger
from tests.support import factories


@pytest.fixture(autouse=True)
def keep_test_connection():
    """The real WSGIHandler closes the database connection when a request ends, which
    would end the test's transaction; Django's test Client detaches the same receiver."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def caller(db, ledger):
    for model in ("gpt-4o", "gpt-4o-mini"):
        factories.price(model, "1", "4", default_max_output_tokens=64, context_window=8192)
    factories.price("text-embedding-3-small", "1", "0")
    factories.price("claude-haiku-4-5", "1", "5", context_window=200_000)
    tier = factories.tier("fuzz", is_default=True, requests_per_minute=100_000,
                          tokens_per_month=10**9, max_concurrent_requests=1000)  # fmt: skip
    user = factories.user(tier)
    token = ScopedTokenObtainPairSerializer.get_token(user).access_token
    return user, str(token)


# schemathesis' pytest plugin does not run under pytest 9; its strategies do, so each
# operation gets a plain Hypothesis run: valid inputs, then deliberately invalid ones.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors_and_no_leaked_reservations(caller, mode):
    user, token = caller
    schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {
        "/v1/chat/completions", "/v1/responses", "/v1/embeddings", "/v1/messages", "/v1/models",
        "/api/llm-quota/usage/", "/api/token/",
    }  # fmt: skip
    for operation in operations:

        # Generated model names are almost never priced: mix in real ones, so the fuzzing
        # reaches admission, the upstream call and settlement, not only validation.
        @given(
            case=operation.as_strategy(generation_mode=mode),
            model=st.sampled_from(
                [None, "gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "claude-haiku-4-5"]
            ),
        )
        @settings(
            max_examples=30,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case, model):
            if model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model
            response = case.call(headers={"Authorization": f"Bearer {token}"})
            assert response.status_code < 500, (case.method, case.path, response.text[:300])
            usage = get_ledger().usage(user.pk)
            assert usage.reserved == 0 and usage.in_flight == 0, (case.method, case.path)

        check()
