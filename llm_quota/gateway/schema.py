"""The OpenAPI description of the ``/v1/`` gateway (drf-spectacular, if installed).

The gateway validates bodies itself (``shapes.chat``) and passes unknown fields on
to the upstream, so these serializers describe OpenAI's shapes for the schema only:
clients, docs and schemathesis read them; nothing validates against them.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from rest_framework import serializers

from llm_quota.shapes.chat import CAP_FIELDS, MAX_CHOICES, ROLES
from llm_quota.shapes.embeddings import MAX_INPUTS

spectacular: ModuleType | None
try:
    from drf_spectacular import utils as spectacular
except ImportError:  # the schema is an optional extra: without it, document nothing
    spectacular = None


def extend_schema(**options: Any) -> Callable[[Any], Any]:
    """drf-spectacular's ``extend_schema``, or a decorator that changes nothing."""
    if spectacular is None:
        return lambda view: view
    return spectacular.extend_schema(**options)


def OpenApiResponse(serializer: Any, description: str) -> Any:  # noqa: N802 - its name
    """drf-spectacular's ``OpenApiResponse``, or None: nothing reads it then."""
    if spectacular is None:
        return None
    return spectacular.OpenApiResponse(serializer, description=description)


class ChatMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=sorted(ROLES))
    content = serializers.CharField(allow_blank=True, help_text="A string or an array of parts.")
    name = serializers.CharField(required=False, max_length=64)


class StreamOptionsSerializer(serializers.Serializer):
    include_usage = serializers.BooleanField(required=False)


class ChatCompletionRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=128)
    messages = ChatMessageSerializer(many=True, allow_empty=False)
    max_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_completion_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    n = serializers.IntegerField(min_value=1, max_value=MAX_CHOICES, required=False)
    stream = serializers.BooleanField(required=False)
    stream_options = StreamOptionsSerializer(required=False)
    temperature = serializers.FloatField(min_value=0, max_value=2, required=False)
    user = serializers.CharField(required=False)


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class AssistantMessageSerializer(serializers.Serializer):
    role = serializers.CharField()
    content = serializers.CharField(allow_null=True)


class ChoiceSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    message = AssistantMessageSerializer()
    finish_reason = serializers.CharField(allow_null=True)


class ChatCompletionSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    model = serializers.CharField()
    choices = ChoiceSerializer(many=True)
    usage = UsageSerializer(required=False)


class ErrorBodySerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    code = serializers.CharField(allow_null=True)
    param = serializers.CharField(allow_null=True)


class ErrorSerializer(serializers.Serializer):
    error = ErrorBodySerializer()


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created = serializers.IntegerField()
    owned_by = serializers.CharField()


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField()
    # DRF's metaclass moves declared fields off the class, so this never hides
    # ``Serializer.data``; the stubs can't know.
    data = ModelSerializer(many=True)  # type: ignore[assignment]


class ResponseRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=128)
    input = serializers.JSONField(help_text="A string, or an array of input items.")
    instructions = serializers.CharField(required=False, allow_null=True)
    tools = serializers.ListField(child=serializers.DictField(), required=False)
    max_output_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    stream = serializers.BooleanField(required=False)


class ResponseUsageSerializer(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField(help_text="Reasoning tokens included.")
    total_tokens = serializers.IntegerField()


class ResponseSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    created_at = serializers.IntegerField()
    status = serializers.CharField()
    model = serializers.CharField()
    output = serializers.ListField(child=serializers.DictField())
    usage = ResponseUsageSerializer(required=False)


class EmbeddingRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=128)
    input = serializers.JSONField(
        help_text="A string, an array of strings, an array of token ids, or an array of "
        f"token id arrays (at most {MAX_INPUTS} inputs)."
    )
    encoding_format = serializers.ChoiceField(choices=["float", "base64"], required=False)
    dimensions = serializers.IntegerField(min_value=1, required=False)
    user = serializers.CharField(required=False)


class EmbeddingSerializer(serializers.Serializer):
    object = serializers.CharField()
    index = serializers.IntegerField()
    embedding = serializers.JSONField(help_text="Floats, or base64 of float32.")


class EmbeddingUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()


class EmbeddingListSerializer(serializers.Serializer):
    object = serializers.CharField()
    data = EmbeddingSerializer(many=True)  # type: ignore[assignment]
    model = serializers.CharField()
    usage = EmbeddingUsageSerializer()


class AnthropicMessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["user", "assistant"])
    content = serializers.JSONField(help_text="A string or an array of content blocks.")


class MessagesRequestSerializer(serializers.Serializer):
    model = serializers.CharField(max_length=128)
    max_tokens = serializers.IntegerField(min_value=1)
    messages = AnthropicMessageSerializer(many=True, allow_empty=False)
    system = serializers.JSONField(required=False, help_text="A string or text blocks.")
    tools = serializers.ListField(child=serializers.DictField(), required=False)
    stream = serializers.BooleanField(required=False)


class MessageUsageSerializer(serializers.Serializer):
    input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()


class MessageSerializer(serializers.Serializer):
    id = serializers.CharField()
    type = serializers.CharField()
    role = serializers.CharField()
    model = serializers.CharField()
    content = serializers.ListField(child=serializers.DictField())
    stop_reason = serializers.CharField(allow_null=True)
    usage = MessageUsageSerializer()


class AnthropicErrorBodySerializer(serializers.Serializer):
    type = serializers.CharField()
    message = serializers.CharField()


class AnthropicErrorSerializer(serializers.Serializer):
    type = serializers.CharField()
    error = AnthropicErrorBodySerializer()


def _errors(*statuses: int, serializer: Any = ErrorSerializer) -> dict[int, Any]:
    text = {
        400: "Invalid request (the field is named in `param`).",
        401: "No or bad access token.",
        403: "`insufficient_scope`, `model_not_allowed` or a blocked account.",
        404: "Unknown model.",
        413: "Body too large.",
        429: "`rate_limit_exceeded` (retry after `Retry-After`) or `insufficient_quota`.",
        502: "The upstream failed or could not be reached.",
        503: "The quota service is unavailable (FAIL_OPEN off).",
        504: "The upstream timed out.",
    }
    return {s: OpenApiResponse(serializer, description=text[s]) for s in statuses}


chat_completions = extend_schema(
    operation_id="chat_completions_create",
    summary="Create a chat completion (OpenAI Chat Completions API), under the caller's quota",
    description=(
        f"The output cap ({' or '.join(CAP_FIELDS)}) may be lowered to what the quota "
        "allows (header `x-llm-quota-max-tokens`). With `stream: true` the answer is "
        "server-sent events ending with `data: [DONE]`."
    ),
    request=ChatCompletionRequestSerializer,
    responses={
        200: OpenApiResponse(ChatCompletionSerializer, description="The completion."),
        **_errors(400, 401, 403, 413, 429, 502, 503, 504),
    },
)
list_models = extend_schema(
    operation_id="models_list",
    responses={200: ModelListSerializer, **_errors(401, 403)},
)
retrieve_model = extend_schema(
    operation_id="models_retrieve",
    responses={200: ModelSerializer, **_errors(401, 403, 404)},
)
responses = extend_schema(
    operation_id="responses_create",
    summary="Create a model response (OpenAI Responses API), under the caller's quota",
    description=(
        "`max_output_tokens` (reasoning included) is always sent, perhaps lowered to what "
        "the quota allows (header `x-llm-quota-max-tokens`). With `stream: true` the answer "
        "is the API's typed server-sent events, ending with `response.completed`. "
        "`previous_response_id` and `conversation` are refused (400): the gateway could "
        "not count the stored input they bill; so is `background: true`, billed after "
        "the call returns."
    ),
    request=ResponseRequestSerializer,
    responses={
        200: OpenApiResponse(ResponseSerializer, description="The response."),
        **_errors(400, 401, 403, 413, 429, 502, 503, 504),
    },
)
embeddings = extend_schema(
    operation_id="embeddings_create",
    summary="Create embeddings (OpenAI Embeddings API), under the caller's quota",
    description=(
        "Priced by input tokens only, counted exactly (token arrays by their length); "
        f"a batch of up to {MAX_INPUTS} inputs is one reservation."
    ),
    request=EmbeddingRequestSerializer,
    responses={
        200: OpenApiResponse(EmbeddingListSerializer, description="The embeddings."),
        **_errors(400, 401, 403, 413, 429, 502, 503, 504),
    },
)
messages = extend_schema(
    operation_id="messages_create",
    summary="Create a message (Anthropic Messages API), under the caller's quota",
    description=(
        "Authenticated by `x-api-key` or a Bearer token. `max_tokens` is required and may "
        "be lowered to what the quota allows (header `x-llm-quota-max-tokens`). With "
        "`stream: true` the answer is Anthropic's named server-sent events, from "
        "`message_start` to `message_stop`. Errors are in Anthropic's shape, refusals "
        "with `retry-after` and `anthropic-ratelimit-*` headers."
    ),
    request=MessagesRequestSerializer,
    responses={
        200: OpenApiResponse(MessageSerializer, description="The message."),
        **_errors(400, 401, 403, 413, 429, 502, 503, 504, serializer=AnthropicErrorSerializer),
    },
)
