"""Parts of a prompt that can only be bounded (a file, images of unknown size) are
reserved at their bound, held to the model's context window: the upstream bills no
prompt longer than the window (it refuses it). Only the counted text can prove a prompt
too long; a file on a model with no window is refused, since nothing bounds it."""

from __future__ import annotations

import pytest

from llm_quota import quota_guard
from llm_quota.exceptions import InvalidRequest
from llm_quota.rules.estimation import count_output
from tests.support import factories, media

pytestmark = pytest.mark.django_db

WINDOW = 128_000
REMOTE = media.image_part("https://images.test/photo.jpg")


def user_message(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Summarize."}, *parts]}]


@pytest.fixture
def user(ledger):
    factories.price("gpt-4o-mini", "1", "4", default_max_output_tokens=100, context_window=WINDOW)
    factories.price("no-window", "1", "4", default_max_output_tokens=100)
    return factories.user(factories.tier(tokens_per_month=10**7))


def test_a_file_reserves_the_whole_context_window(user, ledger):
    messages = user_message(media.file_part(file_id="file-abc"))
    with quota_guard(user, model="gpt-4o-mini", messages=messages, max_tokens=50) as quota:
        assert quota.estimate.prompt_tokens == WINDOW
        assert quota.reservation.reserved == WINDOW + 4 * 50
        quota.settle({"prompt_tokens": 3_000, "completion_tokens": 50})
    assert ledger.usage(user.pk).tokens_this_month == 3_000 + 200


def test_a_file_on_a_model_without_a_context_window_is_refused(user, ledger):
    messages = user_message(media.file_part(media.pdf(3)))
    with pytest.raises(InvalidRequest) as refused:
        quota_guard(user, model="no-window", messages=messages).admit()
    assert refused.value.error_code == "unbounded_prompt"
    assert ledger.usage(user.pk).reserved == 0


def test_images_of_unknown_size_past_the_window_are_held_to_it_not_refused(user):
    # Four remote images on gpt-4o-mini: 4 x 48,177 tokens at worst, past the window.
    messages = user_message(*[REMOTE] * 4)
    with quota_guard(user, model="gpt-4o-mini", messages=messages, max_tokens=50) as quota:
        assert quota.estimate.prompt_tokens == WINDOW
        assert quota.max_tokens == 50
        quota.release()


def test_a_call_that_reports_no_usage_is_charged_the_bounded_prompt(user, ledger):
    messages = user_message(REMOTE)
    with quota_guard(user, model="gpt-4o-mini", messages=messages, max_tokens=50) as quota:
        prompt = quota.estimate.prompt_tokens
        assert prompt > 2833 + 8 * 5667  # the worst image, and the text
        quota.settle_output("tok " * 10)
    output = count_output("tok " * 10, "gpt-4o-mini")
    assert ledger.usage(user.pk).tokens_this_month == prompt + 4 * output


def test_only_counted_text_proves_a_prompt_too_long(user):
    too_long = [{"role": "user", "content": "word " * (WINDOW + 10)}]
    with pytest.raises(InvalidRequest, match="maximum context length"):
        quota_guard(user, model="gpt-4o-mini", messages=too_long).admit()
    # A cap that fits beside the counted text is kept, whatever the bounds say.
    messages = user_message(*[REMOTE] * 4)
    with quota_guard(user, model="gpt-4o-mini", messages=messages, max_tokens=100_000) as quota:
        assert quota.max_tokens == 100_000
        quota.release()
    with pytest.raises(InvalidRequest, match="exceed the model's context length"):
        quota_guard(user, model="gpt-4o-mini", messages=messages, max_tokens=WINDOW).admit()
