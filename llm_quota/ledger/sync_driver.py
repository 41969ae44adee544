"""The ledger on redis-py: the only place where quota is counted, for sync code.

Each operation is a Lua script run by EVALSHA, so no two requests can interleave
between a check and its increment; on one Redis a gated request costs one round trip
to reserve and one to settle. What to run and what the replies mean are the plans of
``ops.py``; this driver only sends them. It knows nothing of HTTP or the ORM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from redis.exceptions import NoScriptError

from llm_quota.ledger import keys
from llm_quota.ledger.operations import LedgerOperations
from llm_quota.ledger.ops import parse_usage, usage_is_trusted
from llm_quota.ledger.plans import LoadMonth, LoadTeamMonth, Plan, ScriptCall, drive
from llm_quota.ledger.replies import UserUsage, text
from llm_quota.rules.periods import day_and_month

#: Index keys read per round trip when walking a cluster's sharded active-user index.
INDEX_BATCH = 512


class Ledger(LedgerOperations):
    """The ledger on redis-py (a plain ``Redis`` or a ``RedisCluster``)."""

    def _run(self, plan: Plan[Any]) -> Any:
        return drive(plan, self.perform)

    def perform(self, step: ScriptCall | LoadMonth | LoadTeamMonth) -> Any:
        """Send one step: a script by EVALSHA, or a month asked of the restore source."""
        if isinstance(step, LoadTeamMonth):
            team_source = self.restore_teams_source
            return None if team_source is None else team_source(step.team, step.month)
        if isinstance(step, LoadMonth):
            if step.api_keys:
                source = self.restore_keys_source
                return [] if source is None else source(step.user_id, step.month)
            if self.restore_source is None:
                return 0, []
            return self.restore_source(step.user_id, step.month)
        script = self._scripts[step.script]
        try:
            # redis-py's Script.__call__ minus its per-call copies and import: this
            # is the hot path, and the loading fallback below is the same.
            return self.client.evalsha(script.sha, len(step.keys), *step.keys, *step.args)
        except NoScriptError:
            script.sha = self.client.script_load(script.script)
            return self.client.evalsha(script.sha, len(step.keys), *step.keys, *step.args)

    def usage_many(self, user_ids: Iterable[Any]) -> dict[str, UserUsage]:
        """Live counters of many users at once (the admin's change list): one pipelined
        round trip on one Redis; on a cluster one script per user (redis-py's cluster
        pipeline cannot load a missing script)."""
        uids = list(dict.fromkeys(keys.user_id(u) for u in user_ids))
        replies = dict(zip(uids, self._usage_replies(uids), strict=True))
        lost = [uid for uid, r in replies.items() if not usage_is_trusted(r)]
        if lost and self.restore_source is not None:
            for uid in lost:
                self.restore(uid, text(replies[uid][2]))
            replies.update(zip(lost, self._usage_replies(lost), strict=True))
        return {uid: parse_usage(r) for uid, r in replies.items()}

    def _usage_replies(self, uids: list[str]) -> list[Any]:
        calls = [self.ops.usage_call(uid) for uid in uids]
        if len(calls) <= 1 or self.cluster:
            # One plain EVALSHA each: a pipeline would first ask SCRIPT EXISTS.
            return [self.perform(call) for call in calls]
        script = self._scripts["usage"]
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            script(keys=list(call.keys), args=list(call.args), client=pipe)
        return list(pipe.execute())

    def now_ms(self) -> int:
        """The ledger's time: the pinned clock, else Redis' own (as the scripts use)."""
        if self.clock is not None:
            return int(self.clock() * 1000)
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def periods(self, now_ms: int | None = None) -> tuple[str, str]:
        """The current day and month ids (``YYYYMMDD``, ``YYYYMM``) in the period zone."""
        return day_and_month(self.now_ms() if now_ms is None else now_ms, self.timezone)

    # -- walking the active users (the snapshot) -----------------------------------------

    def count_active_users(self, month: str, *, since_ms: int | None = None) -> int:
        """How many users the month's index lists, those who settled at or after
        ``since_ms`` if given (a progress bar's total)."""
        low = "-inf" if since_ms is None else int(since_ms)
        if not self.cluster:
            return int(self.client.zcount(self.keyspace.active_users(month), low, "+inf"))
        total = 0
        shards = self.keyspace.index_shards()
        for start in range(0, len(shards), INDEX_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for base in shards[start : start + INDEX_BATCH]:
                pipe.zcount(f"{base}:a:{month}", low, "+inf")
            total += sum(int(n) for n in pipe.execute())
        return total

    def active_user_ids(self, month: str, *, since_ms: int | None = None) -> Iterator[str]:
        """Every user who settled in ``month`` (``YYYYMM``), at or after ``since_ms``.

        The snapshot's way to find users without ``KEYS``: on one Redis it scans one
        sorted set; on a cluster it reads every slot's shard of the index, batched
        per round trip, so every primary is walked. ZSCAN may hand an id out twice
        while the set grows; the snapshot's upserts are idempotent, so that is harmless.
        """
        low = "-inf" if since_ms is None else int(since_ms)
        if not self.cluster:
            key = self.keyspace.active_users(month)
            for member, score in self.client.zscan_iter(key, count=1000):
                if low == "-inf" or score >= low:
                    yield text(member)
            return
        shards = self.keyspace.index_shards()
        for start in range(0, len(shards), INDEX_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for base in shards[start : start + INDEX_BATCH]:
                pipe.zrangebyscore(f"{base}:a:{month}", low, "+inf")
            for members in pipe.execute():
                for member in members:
                    yield text(member)

    # -- walking the active API keys (the snapshot) --------------------------------------

    def active_keys(self, month: str, *, since_ms: int | None = None) -> Iterator[tuple[str, int]]:
        """``("<user id>:<key id>", last settle ms)`` for every key that settled in
        ``month``, at or after ``since_ms``: ``active_user_ids``' walk, on the key index."""
        low = "-inf" if since_ms is None else int(since_ms)
        if not self.cluster:
            key = self.keyspace.active_keys(month)
            for member, score in self.client.zscan_iter(key, count=1000):
                if low == "-inf" or score >= low:
                    yield text(member), int(score)
            return
        shards = self.keyspace.index_shards()
        for start in range(0, len(shards), INDEX_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for base in shards[start : start + INDEX_BATCH]:
                pipe.zrangebyscore(f"{base}:k:{month}", low, "+inf", withscores=True)
            for members in pipe.execute():
                for member, score in members:
                    yield text(member), int(score)
