"""The Redis ledger: the only place where quota is counted.

Each operation is a Lua script run by EVALSHA, so no two requests can interleave
between a check and its increment; on one Redis a gated request costs one round trip
to reserve and one to settle. What to run and what the replies mean lives in
``ledger_ops.py``, shared with ``async_ledger.py``; this module only sends the calls,
with redis-py (a plain ``Redis`` or a ``RedisCluster``).

This module knows nothing of HTTP or the ORM: it takes a redis-py client, plain
limits and a priced estimate. ``get_ledger()`` builds the project's ledger from
settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from redis.exceptions import NoScriptError

from llm_quota.ledger import keys
from llm_quota.ledger.ops import (
    SCRIPTS,
    LedgerOps,
    LoadMonth,
    Plan,
    ScriptCall,
    parse_usage,
    script_source,
    usage_is_trusted,
)
from llm_quota.ledger.replies import (
    Decision,
    GlobalUsage,
    PeriodReset,
    Reservation,
    RestoreSource,
    Settlement,
    UserUsage,
    text,
)
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits
from llm_quota.rules.periods import day_and_month

#: Index keys read per round trip when walking a cluster's sharded active-user index.
INDEX_BATCH = 512


def is_cluster_client(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncRedisCluster)


class Ledger:
    """Reserve, settle and release against one Redis or one Redis Cluster, atomically.

    ``clock`` pins time (seconds since the epoch) for tests and replays; without it the
    scripts use Redis' own clock. ``restore`` returns a user's month from the
    database when Redis has lost it (``(base_tokens, [ModelUsage, ...])``).
    ``cluster`` defaults to whether ``client`` is a ``RedisCluster``.
    """

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "llmq",
        reservation_ttl: float = 600,
        timezone: str = "UTC",
        clock: Callable[[], float] | None = None,
        restore: RestoreSource | None = None,
        cluster: bool | None = None,
    ) -> None:
        self.client = client
        self.cluster = is_cluster_client(client) if cluster is None else cluster
        self.ops = LedgerOps(
            prefix=prefix,
            reservation_ttl=reservation_ttl,
            timezone=timezone,
            clock=clock,
            cluster=self.cluster,
        )
        self.keyspace = self.ops.keyspace
        self.ttl_ms = self.ops.ttl_ms
        self.timezone = timezone
        self.restore_source = restore
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    @property
    def clock(self) -> Callable[[], float] | None:
        return self.ops.clock

    # -- the executor ------------------------------------------------------------------

    def _run(self, plan: Plan[Any]) -> Any:
        """Send each step of ``plan`` and hand it the reply, or throw it the error."""
        reply: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = plan.send(reply) if error is None else plan.throw(error)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = self._perform(step)
            except Exception as exc:
                error = exc

    def _perform(self, step: ScriptCall | LoadMonth) -> Any:
        if isinstance(step, LoadMonth):
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

    # -- the operations (see LedgerOps for what each does) -------------------------------

    def reserve(
        self,
        user_id: Any,
        limits: Limits,
        estimate: Estimate,
        *,
        clamp: bool = True,
        min_output_tokens: int = 16,
        probe_prompt_tokens: int | None = None,
        probe_clamp: bool = True,
    ) -> Decision:
        return self._run(
            self.ops.reserve(
                user_id,
                limits,
                estimate,
                clamp=clamp,
                min_output_tokens=min_output_tokens,
                probe_prompt_tokens=probe_prompt_tokens,
                probe_clamp=probe_clamp,
            )  # fmt: skip
        )

    def settle(self, reservation: Reservation, usage: ActualUsage) -> Settlement:
        """Replace the estimate by the real usage; a second call changes nothing."""
        return self._run(self.ops.settle(reservation, usage))

    def release(self, reservation: Reservation) -> bool:
        """Give the whole estimate back (a failed call); a second call changes nothing."""
        return self._run(self.ops.release(reservation))

    def usage(self, user_id: Any) -> UserUsage:
        """The user's live counters; lost ones are restored first, as reserve would."""
        return self._run(self.ops.usage(user_id, restore_lost=self.restore_source is not None))

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
            return [self._perform(call) for call in calls]
        script = self._scripts["usage"]
        pipe = self.client.pipeline(transaction=False)
        for call in calls:
            script(keys=list(call.keys), args=list(call.args), client=pipe)
        return list(pipe.execute())

    def global_usage(self) -> GlobalUsage:
        """Everyone's tokens against the global caps, expired shares given back."""
        return self._run(self.ops.global_usage())

    def restore(self, user_id: Any, month: str) -> bool:
        """Add the database's record of ``month`` (and the month before) back, once."""
        return self._run(self.ops.restore(user_id, month))

    def reset_period(self, user_id: Any) -> PeriodReset:
        """Forgive the user's usage of the current day and month (see ``LedgerOps``)."""
        return self._run(self.ops.reset_period(user_id))

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
