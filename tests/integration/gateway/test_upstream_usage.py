"""An upstream's ``usage`` is checked before it is charged (contract §5): a count that is
missing, not an integer, negative, NaN, absurd or below what the answer certainly used
is never charged as reported (and never 0); the counted output and the estimate's prompt
stand in. Usage above the reservation is charged in full and signalled. On real Redis,
through both gateways, from completions and from streams."""

from __future__ import annotations

import logging

import pytest

from llm_quota.rules.estimation import count_messages, count_output
from llm_quota.signals import usage_overrun
from tests.support import factories, fake_upstream
from tests.support.fake_upstream import BAD_USAGE, PROMPT
from tests.support.gateway import MSGS

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 20


@pytest.fixture
def user(either_gateway, upstream):
    factories.tier("free", is_default=True)
    return factories.user()


@pytest.fixture
def overruns():
    seen = []

    def receiver(**kwargs):
        seen.append(kwargs)

    usage_overrun.connect(receiver, weak=False, dispatch_uid="test-overruns")
    yield seen
    usage_overrun.disconnect(dispatch_uid="test-overruns")


def call(gateway, user, model: str, stream: bool, max_tokens: int = CAP) -> str:
    """The answer's text, as the client saw it."""
    client = gateway.client(user)
    if not stream:
        reply = client.chat.completions.create(model=model, messages=MSGS, max_tokens=max_tokens)
        return reply.choices[0].message.content
    chunks = client.chat.completions.create(
        model=model, messages=MSGS, max_tokens=max_tokens, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
@pytest.mark.parametrize("model", BAD_USAGE)
def test_bad_upstream_usage_is_charged_as_counted_never_as_reported(
    either_gateway, user, overruns, caplog, model, stream
):
    with caplog.at_level(logging.WARNING, logger="llm_quota"):
        text = call(either_gateway, user, model, stream)
    assert text == "".join(fake_upstream.word(i) for i in range(CAP))
    used = either_gateway.model_usage(user, model)
    assert used is not None, "the call was never charged"
    # The estimate's counted prompt, and the output counted: 0 was reported for some.
    assert (used.requests, used.input_tokens, used.output_tokens) == (
        1, count_messages(MSGS, model), count_output(text, model),
    )  # fmt: skip
    assert used.output_tokens == CAP > 0
    live = either_gateway.usage(user)
    assert live.reserved == 0 and live.in_flight == 0
    assert live.tokens_this_month == used.input_tokens + 2 * used.output_tokens
    assert "cannot be charged as reported" in caplog.text
    assert overruns == []  # what was charged fits what was reserved


@pytest.mark.parametrize("stream", [False, True], ids=["completion", "stream"])
def test_usage_above_the_reservation_is_charged_in_full_and_signalled(
    either_gateway, user, overruns, caplog, stream
):
    with caplog.at_level(logging.WARNING, logger="llm_quota"):
        call(either_gateway, user, "up-ignores-cap", stream, max_tokens=10)
    output = 10 + fake_upstream.EXTRA
    used = either_gateway.model_usage(user, "up-ignores-cap")
    assert (used.input_tokens, used.output_tokens) == (PROMPT, output)
    assert either_gateway.usage(user).reserved == 0
    [overrun] = overruns
    reserved = count_messages(MSGS, "up-ignores-cap") + 2 * 10
    assert overrun["user_id"] == str(user.pk) and overrun["model"] == "up-ignores-cap"
    assert (overrun["reserved"], overrun["charged"]) == (reserved, PROMPT + 2 * output)
    assert (overrun["input_tokens"], overrun["output_tokens"], overrun["max_tokens"]) == (
        PROMPT, output, 10,
    )  # fmt: skip
    assert "overran it" in caplog.text


def test_good_usage_is_charged_as_reported_without_a_warning(either_gateway, user, caplog):
    with caplog.at_level(logging.WARNING, logger="llm_quota"):
        call(either_gateway, user, "up-normal", stream=False)
    used = either_gateway.model_usage(user, "up-normal")
    assert (used.input_tokens, used.output_tokens) == (PROMPT, CAP)
    assert "cannot be charged" not in caplog.text and "overran" not in caplog.text
