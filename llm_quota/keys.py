"""Every Redis key this app touches is built here, from validated parts only.

A user's keys all start with ``<prefix>:{u:<id>}`` so that Redis Cluster puts them in
one slot and the per-user Lua scripts stay single-slot. The scripts receive these
bases and append the suffixes listed in ``lua/common.lua``; nothing user-controlled
(a model name, a reservation id from a client) ever becomes part of a key name.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

_USER_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
_RESERVATION_ID = re.compile(r"^[0-9a-f]{32}$")
# Alert markers name a limit (a fixed vocabulary) and a period id (digits).
_ALERT_PART = re.compile(r"^[a-z0-9_]{1,64}$")
# Model names become hash *fields* (never key names); still refuse anything that
# could confuse the ``kind|model`` field layout or flood memory.
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")


class InvalidKeyPart(ValueError):
    """A value that may not be used to build a Redis key or field."""


def user_id(value: Any) -> str:
    """The canonical string form of a user's primary key, or ``InvalidKeyPart``."""
    if isinstance(value, bool):
        raise InvalidKeyPart("a user id may not be a boolean")
    if isinstance(value, int):
        if value < 0:
            raise InvalidKeyPart("a user id may not be negative")
        return str(value)
    if isinstance(value, uuid.UUID):
        return value.hex
    text = str(value)
    if not _USER_ID.match(text):
        raise InvalidKeyPart(f"unsafe user id {text[:80]!r}")
    return text


def prefix(value: str) -> str:
    if not _PREFIX.match(value):
        raise InvalidKeyPart(f"unsafe KEY_PREFIX {value[:80]!r}")
    return value


def reservation_id(value: str | None = None) -> str:
    """A fresh reservation id, or the given one once it is known to be well-formed."""
    if value is None:
        return uuid.uuid4().hex
    if not isinstance(value, str) or not _RESERVATION_ID.match(value):
        raise InvalidKeyPart("malformed reservation id")
    return value


def model_name(value: Any) -> str:
    if not isinstance(value, str) or not _MODEL.match(value):
        raise InvalidKeyPart("model names are 1-128 characters of letters, digits and ._:/@+-")
    return value


def is_valid_model_name(value: Any) -> bool:
    return isinstance(value, str) and bool(_MODEL.match(value))


@dataclass(frozen=True)
class KeySpace:
    """The key bases of one deployment (one ``KEY_PREFIX``)."""

    prefix: str = "llmq"

    def __post_init__(self) -> None:
        prefix(self.prefix)

    def user(self, uid: Any) -> str:
        return f"{self.prefix}:{{u:{user_id(uid)}}}"

    def global_(self) -> str:
        return f"{self.prefix}:{{g}}"

    def index(self) -> str:
        """Base of the active-user index the snapshot walks instead of ``KEYS``."""
        return f"{self.prefix}:{{idx}}"

    # Concrete keys, for readers outside the scripts (usage views, snapshot, tests).
    def month_counter(self, uid: Any, month: str) -> str:
        return f"{self.user(uid)}:m:{month}"

    def day_counter(self, uid: Any, day: str) -> str:
        return f"{self.user(uid)}:d:{day}"

    def model_usage(self, uid: Any, month: str) -> str:
        return f"{self.user(uid)}:u:{month}"

    def active_users(self, month: str) -> str:
        return f"{self.index()}:a:{month}"

    def user_state(self, uid: Any) -> str:
        """HASH with ``reserved`` and the ``seen`` marker (counters are trusted)."""
        return f"{self.user(uid)}:s"

    def alert_sent(self, uid: Any, limit: str, threshold: int, period: str) -> str:
        """Dedupe marker: one alert per user, limit, threshold and period."""
        if not _ALERT_PART.match(limit) or not _ALERT_PART.match(period):
            raise InvalidKeyPart("unsafe alert limit or period")
        return f"{self.user(uid)}:al:{limit}:{int(threshold)}:{period}"

    def snapshot_lock(self) -> str:
        """Serialises snapshot runs (and period resets) of this deployment."""
        return f"{self.index()}:snap:lock"

    def snapshot_status(self) -> str:
        """HASH describing the last finished snapshot run, for the admin."""
        return f"{self.index()}:snap:last"
