"""Every Redis key this app touches is built here, from validated parts only.

A user's keys all start with ``<prefix>:{u:<id>}`` so that Redis Cluster puts them in
one slot and the per-user Lua scripts stay single-slot; the global caps have their own
slot (``{g}``), and on a cluster the active-user index is split by slot. The scripts receive these
bases and append the suffixes listed in ``lua/common.lua``; nothing user-controlled
(a model name, a reservation id from a client) ever becomes part of a key name.
"""

from __future__ import annotations

import re
import uuid
from binascii import crc_hqx
from dataclasses import dataclass
from functools import cache
from typing import Any

# Each pattern must match a part whole (``fullmatch``): ``$`` also matches before a
# trailing newline, so ``re.match`` would let ``"gpt-4o\n"`` through.
_USER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PREFIX = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_RESERVATION_ID = re.compile(r"[0-9a-f]{32}")
# An API key's id (its primary key) names its counters under its user's base.
_API_KEY_ID = re.compile(r"[0-9]{1,20}")
# Alert markers name a limit (a fixed vocabulary) and a period id (digits).
_ALERT_PART = re.compile(r"[a-z0-9_]{1,64}")
# Model names become hash *fields* (never key names); still refuse anything that
# could confuse the ``kind|model`` field layout or flood memory.
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
# A price row's pattern names usage too (past ``MODEL_NAMES_PER_MONTH`` names): a
# name's characters plus fnmatch's own, still never ``|``.
_PATTERN = re.compile(r"[A-Za-z0-9._:/@+*?\[\]!-]{1,128}")


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
    if not _USER_ID.fullmatch(text):
        raise InvalidKeyPart(f"unsafe user id {text[:80]!r}")
    return text


def api_key_id(value: Any) -> str:
    """The canonical string form of an ``ApiKey``'s primary key, or ``InvalidKeyPart``."""
    text = str(value)
    if isinstance(value, bool) or not _API_KEY_ID.fullmatch(text):
        raise InvalidKeyPart(f"unsafe API key id {text[:80]!r}")
    return text


def prefix(value: str) -> str:
    if not _PREFIX.fullmatch(value):
        raise InvalidKeyPart(f"unsafe KEY_PREFIX {value[:80]!r}")
    return value


def reservation_id(value: str | None = None) -> str:
    """A fresh reservation id, or the given one once it is known to be well-formed."""
    if value is None:
        return uuid.uuid4().hex
    if not isinstance(value, str) or not _RESERVATION_ID.fullmatch(value):
        raise InvalidKeyPart("malformed reservation id")
    return value


def model_name(value: Any) -> str:
    if not isinstance(value, str) or not _MODEL.fullmatch(value):
        raise InvalidKeyPart("model names are 1-128 characters of letters, digits and ._:/@+-")
    return value


def is_valid_model_name(value: Any) -> bool:
    return isinstance(value, str) and bool(_MODEL.fullmatch(value))


def model_field(value: Any) -> str:
    """A model name, or a price row's pattern: what the per-model usage hash (and a
    ``UsageSnapshot`` row) may be named."""
    if isinstance(value, str) and _PATTERN.fullmatch(value):
        return value
    raise InvalidKeyPart("a model field is a model name or a price row's pattern")


# -- Redis Cluster slots ---------------------------------------------------------------

CLUSTER_SLOTS = 16384


def cluster_slot(key: str) -> int:
    """The slot Redis Cluster puts ``key`` in: CRC16 of its hash tag (the cluster spec)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start > -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc_hqx(raw, 0) % CLUSTER_SLOTS


@cache
def _index_tags() -> tuple[int, ...]:
    """For each slot, the least n whose hash tag ``idx:<n>`` lands in that slot.

    About 150,000 CRC16s, once per process and only on a cluster: what lets settle
    write the active-user index in the user's own slot (no cross-slot step, no hot key).
    """
    tags = [-1] * CLUSTER_SLOTS
    missing, n = CLUSTER_SLOTS, 0
    while missing:
        slot = crc_hqx(b"idx:%d" % n, 0) % CLUSTER_SLOTS
        if tags[slot] < 0:
            tags[slot] = n
            missing -= 1
        n += 1
    return tuple(tags)


@dataclass(frozen=True)
class KeySpace:
    """The key bases of one deployment (one ``KEY_PREFIX``)."""

    prefix: str = "llmq"

    def __post_init__(self) -> None:
        prefix(self.prefix)

    def user(self, uid: Any) -> str:
        return f"{self.prefix}:{{u:{user_id(uid)}}}"

    def api_key(self, uid: Any, key_id: Any) -> str:
        """An API key's base: under its user's hash tag, so on a cluster the key's
        counters share the user's slot and one reserve script checks both."""
        return f"{self.user(uid)}:k:{api_key_id(key_id)}"

    def active_keys(self, month: str) -> str:
        """ZSET ``<uid>:<key id>`` -> last settle time (one Redis; on a cluster each
        index shard holds its own, see ``index_shards``)."""
        return f"{self.index()}:k:{month}"

    def team(self, team_id: Any) -> str:
        """A team's base: its own hash tag, shared by its members wherever their own
        slots are (on a cluster a second step, like the global caps)."""
        return f"{self.prefix}:{{t:{api_key_id(team_id)}}}"

    def team_state(self, team_id: Any) -> str:
        """HASH with the team's ``seen`` marker (its counters are trusted)."""
        return f"{self.team(team_id)}:s"

    def team_usage(self, team_id: Any, month: str) -> str:
        """HASH of the team's settled month: totals, ``|u:<uid>``, ``|m:<model>``."""
        return f"{self.team(team_id)}:n:{month}"

    def team_day(self, team_id: Any, day: str) -> str:
        """The team's day counter (settled plus reserved base tokens)."""
        return f"{self.team(team_id)}:d:{day}"

    def api_key_day(self, uid: Any, key_id: Any, day: str) -> str:
        """An API key's day counter (settled plus reserved base tokens)."""
        return f"{self.api_key(uid, key_id)}:d:{day}"

    def global_(self) -> str:
        return f"{self.prefix}:{{g}}"

    def index(self) -> str:
        """Base of the active-user index on one Redis (the snapshot walks it instead of
        ``KEYS``, through ``Ledger.active_user_ids``, which also knows the cluster's)."""
        return f"{self.prefix}:{{idx}}"

    def index_shard(self, uid: Any) -> str:
        """On a cluster: the index base in ``uid``'s own slot (see ``index_shards``)."""
        return self.index_shard_of_slot(cluster_slot(self.user(uid)))

    def index_shard_of_slot(self, slot: int) -> str:
        return f"{self.prefix}:{{idx:{_index_tags()[slot]}}}"

    def index_shards(self) -> list[str]:
        """Every slot's index base: on a cluster the index is split by slot, so that
        settle writes it in the user's slot; together they hold every active user."""
        return [self.index_shard_of_slot(slot) for slot in range(CLUSTER_SLOTS)]

    def config_channel(self) -> str:
        """Pub/sub channel announcing tier, quota and price edits to every process."""
        return f"{self.prefix}:config"

    # Concrete keys, for readers outside the scripts (usage views, snapshot, tests).
    def month_counter(self, uid: Any, month: str) -> str:
        return f"{self.user(uid)}:m:{month}"

    def day_counter(self, uid: Any, day: str) -> str:
        return f"{self.user(uid)}:d:{day}"

    def model_usage(self, uid: Any, month: str) -> str:
        return f"{self.user(uid)}:u:{month}"

    def active_users(self, month: str) -> str:
        return f"{self.index()}:a:{month}"

    def paused(self) -> str:
        """ZSET user id -> when their burn-rate pause ends (ms): a listing for the
        admin's "paused" filter. The pause itself is the user's own (``burn.lua``)."""
        return f"{self.index()}:paused"

    def paused_keys(self) -> str:
        """ZSET API key id -> when its own burn-rate pause ends (ms), as ``paused``."""
        return f"{self.index()}:paused:k"

    def paused_teams(self) -> str:
        """ZSET team id -> when its burn-rate pause ends (ms), as ``paused``."""
        return f"{self.index()}:paused:t"

    def user_state(self, uid: Any) -> str:
        """HASH with ``reserved`` and the ``seen`` marker (counters are trusted)."""
        return f"{self.user(uid)}:s"

    def alert_sent(self, uid: Any, limit: str, threshold: int, period: str) -> str:
        """Dedupe marker: one alert per user, limit, threshold and period."""
        if not _ALERT_PART.fullmatch(limit) or not _ALERT_PART.fullmatch(period):
            raise InvalidKeyPart("unsafe alert limit or period")
        return f"{self.user(uid)}:al:{limit}:{int(threshold)}:{period}"

    def team_alert_sent(self, team_id: Any, threshold: int, period: str) -> str:
        """Dedupe marker: one team soft-limit alert per team, threshold and month."""
        if not _ALERT_PART.fullmatch(period):
            raise InvalidKeyPart("unsafe alert period")
        return f"{self.team(team_id)}:al:{int(threshold)}:{period}"

    def team_budget_alert_sent(self, team_id: Any, limit: str, period: str) -> str:
        """Dedupe marker: one team budget alert per team, limit and period."""
        if not _ALERT_PART.fullmatch(limit) or not _ALERT_PART.fullmatch(period):
            raise InvalidKeyPart("unsafe alert limit or period")
        return f"{self.team(team_id)}:ab:{limit}:{period}"

    def snapshot_lock(self) -> str:
        """Serialises snapshot runs (and period resets) of this deployment."""
        return f"{self.index()}:snap:lock"

    def snapshot_status(self) -> str:
        """HASH describing the last finished snapshot run, for the admin."""
        return f"{self.index()}:snap:last"

    def snapshot_watermark(self) -> str:
        """HASH: when the last successful snapshot run (and full walk) started; lost
        with Redis' data, which is what makes the next run walk everything again."""
        return f"{self.index()}:snap:mark"

    def snapshot_lost(self, month: str) -> str:
        """SET of users a snapshot run skipped (counters lost, not yet restored); an
        incremental run reads them again whatever their last settle time."""
        return f"{self.index()}:snap:lost:{month}"
