"""The Embeddings API shape (``POST /v1/embeddings``): billed for its input alone.

- ``EmbeddingsRequest``: the body, checked before anything is reserved. ``input`` is a
  string, a list of strings, a token array, or a list of token arrays (OpenAI's four
  forms), at most ``MAX_INPUTS`` of them: the whole batch is one reservation. Every
  other field (``encoding_format``, ``dimensions``, ``user``) passes through untouched.
- What is billed: the inputs, exactly (``rules.estimation``'s ``inputs``: each text's
  tokens in the model's encoding, each token array's length), and no output: the
  output cap is 0, and nothing caps it upstream (an embedding has no output tokens).
- What it used: the answer's ``usage.prompt_tokens``, read as input with no output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from llm_quota.exceptions import InvalidRequest
from llm_quota.rules.estimation import INPUTS
from llm_quota.shapes.base import Used, checked_body

PATH = "embeddings"
#: OpenAI's limit of inputs in one request ("must be 2048 dimensions or less").
MAX_INPUTS = 2048


def _token_array(value: list[Any], param: str) -> list[int]:
    if not value:
        raise InvalidRequest(f"'{param}' must not be an empty token array.", param=param)
    for token in value:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidRequest(
                f"'{param}' must be an array of non-negative integer token ids.", param=param
            )
    return value


def _text(value: str, param: str) -> str:
    if not value:
        raise InvalidRequest(f"'{param}' must not be an empty string.", param=param)
    return value


def read_inputs(value: Any) -> list[str | list[int]]:
    """The body's ``input`` as a list of texts and token arrays, or ``InvalidRequest``."""
    if isinstance(value, str):
        return [_text(value, "input")]
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a string, an array of strings, an array of tokens, or an "
            "array of token arrays.",
            param="input",
        )
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [_token_array(value, "input")]  # one token array
    if len(value) > MAX_INPUTS:
        raise InvalidRequest(f"'input' may hold at most {MAX_INPUTS} inputs.", param="input")
    inputs: list[str | list[int]] = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if isinstance(item, str):
            inputs.append(_text(item, where))
        elif isinstance(item, list):
            inputs.append(_token_array(item, where))
        else:
            raise InvalidRequest(
                f"'{where}' must be a string or an array of token ids.", param=where
            )
    return inputs


@dataclass(frozen=True)
class EmbeddingsRequest:
    path: ClassVar[str] = PATH
    #: Embeddings are never streamed.
    stream: ClassVar[bool] = False
    body: dict[str, Any]
    model: str
    inputs: list[str | list[int]]

    @classmethod
    def from_body(cls, body: Any) -> EmbeddingsRequest:
        """Validate a parsed JSON body, or raise ``InvalidRequest`` naming the field."""
        body, model = checked_body(body)
        return cls(body=body, model=model, inputs=read_inputs(body.get("input")))

    def quota_kwargs(self) -> dict[str, Any]:
        """The inputs, counted exactly; no output (a cap of 0)."""
        return {"model": self.model, "max_tokens": 0, INPUTS: self.inputs}

    def upstream_body(self, max_tokens: int, cap_field: str = "") -> dict[str, Any]:
        """The body as sent: an embedding has no output to cap."""
        return self.body

    def read(self, answer: Any) -> Used:
        return read_embeddings(answer)

    def watch(self) -> Any:  # pragma: no cover - never streamed
        raise NotImplementedError("embeddings are not streamed")


def read_embeddings(answer: Any) -> Used:
    """What an embeddings answer used: its ``prompt_tokens``, and no output. A report
    without a count is None: the input counted at admission is charged instead."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return Used({"prompt_tokens": None, "completion_tokens": 0}, "")
    return Used({"prompt_tokens": usage["prompt_tokens"], "completion_tokens": 0}, "")
