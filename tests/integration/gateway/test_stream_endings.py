"""How a streamed answer ends, seen by the official openai SDK, on the sync view (live
server) and the async view (uvicorn): ``[DONE]`` only after the upstream's own; a stream
the upstream cut short, by a reset or by a clean end without ``[DONE]``, ends in an
``error`` event, which the SDK raises, and is charged what was generated."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support import factories
from tests.support.fake_upstream import DROP_AFTER
from tests.support.gateway import MSGS, access_token

pytestmark = pytest.mark.django_db(transaction=True)

CUT_SHORT = {"up-drop": "upstream_dropped", "up-truncate": "upstream_truncated"}


@pytest.fixture
def user(either_gateway, upstream):
    factories.tier("free", is_default=True)
    return factories.user()


@pytest.mark.parametrize("model", CUT_SHORT)
def test_a_stream_cut_short_raises_in_the_sdk_and_is_charged_what_was_sent(
    either_gateway, user, model
):
    stream = either_gateway.client(user).chat.completions.create(
        model=model, messages=MSGS, max_tokens=30, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert info.value.code == CUT_SHORT[model]
    assert len(seen) == DROP_AFTER
    used = either_gateway.model_usage(user, model)
    assert (used.requests, used.output_tokens) == (1, DROP_AFTER)  # one token per chunk
    live = either_gateway.usage(user)
    assert live.reserved == 0 and live.in_flight == 0


@pytest.mark.parametrize("model", [*CUT_SHORT, "up-normal"])
def test_done_is_sent_only_after_the_upstreams_own(either_gateway, user, model):
    response = httpx.post(
        either_gateway.base_url + "/chat/completions",
        json={"model": model, "messages": MSGS, "max_tokens": 5, "stream": True},
        headers={"Authorization": f"Bearer {access_token(user)}"},
    )
    assert response.status_code == 200
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    if model == "up-normal":
        assert events[-1] == "data: [DONE]"
    else:
        assert "data: [DONE]" not in events
        assert f'"code":"{CUT_SHORT[model]}"' in events[-1]
