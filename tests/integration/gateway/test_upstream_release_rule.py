"""The gateway's own upstream calls follow the release rule (``quota.release_rule``):
its error answer and a refused connection release (``test_upstream``,
``test_async_view``); a timeout after the request was sent may follow a billed
answer, so both views charge the estimate."""

from __future__ import annotations

import json

import pytest

from llm_quota.quota.admission import estimate_request
from tests.integration.gateway.test_async_view import BODY, _auth, async_post, sync_post
from tests.support import factories
from tests.support.gateway import MSGS

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def impatient(settings, upstream):
    """The tests' upstream, waited on for 50 ms (set before ``ledger``: a settings
    change drops the project's ledger)."""
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM_READ_TIMEOUT": 0.05}
    return upstream


@pytest.mark.parametrize("post", [sync_post, async_post], ids=["drf-view", "async-view"])
def test_an_upstream_timeout_is_504_and_charged_the_estimate(impatient, ledger, post):
    factories.price("up-*", "1", "2", default_max_output_tokens=100)
    factories.tier("free", is_default=True)
    user = factories.user()
    body = BODY | {"model": "up-slow"}  # answers after 0.3 s

    response = post(body, _auth(user))

    assert response.status_code == 504
    assert json.loads(response.body)["error"]["code"] == "upstream_timeout"
    live = ledger.usage(user.pk)
    assert live.reserved == 0 and live.in_flight == 0
    estimate = estimate_request("up-slow", messages=MSGS, max_tokens=BODY["max_tokens"])
    assert live.tokens_this_month == estimate.base_tokens


class _LostAnswer:
    """A project's own ``UPSTREAM`` whose call was sent, then failed in a way no rule
    knows (the README presents the class as an extension point)."""

    def complete(self, body):
        raise TimeoutError("the answer was lost")

    async def acomplete(self, body):
        raise TimeoutError("the answer was lost")


@pytest.fixture
def lost_answer(settings, quota_prefix):
    """``_LostAnswer`` as the project's upstream (set before ``ledger``, as above)."""
    settings.LLM_QUOTA = {**settings.LLM_QUOTA, "UPSTREAM": f"{__name__}._LostAnswer"}


@pytest.mark.parametrize("post", [sync_post, async_post], ids=["drf-view", "async-view"])
def test_an_unknown_failure_of_the_call_is_charged_the_estimate(lost_answer, ledger, post):
    factories.price("up-*", "1", "2", default_max_output_tokens=100)
    factories.tier("free", is_default=True)
    user = factories.user()

    response = post(BODY | {"model": "up-normal"}, _auth(user))

    assert response.status_code == 500

    live = ledger.usage(user.pk)
    assert live.reserved == 0 and live.in_flight == 0
    estimate = estimate_request("up-normal", messages=MSGS, max_tokens=BODY["max_tokens"])
    assert live.tokens_this_month == estimate.base_tokens  # never 0 for a call that ran
