"""Model names: checked whole, and a caller cannot invent unbounded distinct names."""

from __future__ import annotations

import httpx
import pytest

from tests.support import factories
from tests.support.gateway import MSGS, access_token


@pytest.mark.parametrize("model", ["up-haiku-4-5-2\n", "gpt-4o\n", "up-x\ny", " up-x"])
def test_a_model_name_with_a_newline_or_space_is_400_and_reserves_nothing(gateway, model):
    # "up-*" prices any suffix, a newline too (fnmatch's ".*" is DOTALL): only the
    # name check stands between such a name and a Redis field.
    factories.tier("free", is_default=True)
    user = factories.user()
    response = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": model, "messages": MSGS, "max_tokens": 5},
        headers={"Authorization": f"Bearer {access_token(user)}"},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    usage = gateway.usage(user)
    assert usage.reserved == 0 and usage.requests_this_minute == 0 and usage.by_model == []
