"""The text a completion generated, for settling when the upstream reports no usage.

Everything the model wrote is billed as output: the message content, refusals, tool
call names and arguments, and the reasoning text some compatible servers stream
(``reasoning_content``/``reasoning``). Counting all of it errs on the side of
charging, like the estimate does.
"""

from __future__ import annotations

from typing import Any

TEXT_FIELDS = ("content", "refusal", "reasoning_content", "reasoning")


def _parts(message: Any) -> list[str]:
    if not isinstance(message, dict):
        return []
    parts = [message[name] for name in TEXT_FIELDS if isinstance(message.get(name), str)]
    for call in message.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            parts += [
                function[k] for k in ("name", "arguments") if isinstance(function.get(k), str)
            ]
    return parts


def reported_usage(usage: Any) -> dict[str, Any] | None:
    """An upstream's ``usage`` if a settle can rely on it (it counts the output), else None:
    the caller then settles from the generated text instead."""
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage
    return None


def completion_text(completion: Any) -> str:
    """Everything generated in a non-streamed ``chat.completion`` body."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    parts: list[str] = []
    for choice in choices or []:
        if isinstance(choice, dict):
            parts += _parts(choice.get("message"))
    return "".join(parts)


class StreamedOutput:
    """Collects the deltas of a streamed completion as they pass through."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def add(self, chunk: Any) -> None:
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        for choice in choices or []:
            if isinstance(choice, dict):
                self._parts += _parts(choice.get("delta"))

    @property
    def text(self) -> str:
        return "".join(self._parts)
