"""The ledger's operations, written once for the sync and the async driver.

Each method hands a plan of ``LedgerOps`` to the driver's ``_run``: the sync
``Ledger`` returns its result, the ``AsyncLedger`` a coroutine to await. The methods
say only which plan; how a step is sent is the driver's business.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_quota.ledger.ops import SCRIPTS, LedgerOps, script_source
from llm_quota.ledger.plans import Plan
from llm_quota.ledger.replies import Reservation, RestoreSource
from llm_quota.rules.accounting import ActualUsage, Estimate, Limits


def is_cluster_client(client: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
    from redis.cluster import RedisCluster

    return isinstance(client, RedisCluster | AsyncRedisCluster)


class LedgerOperations:
    """Reserve, settle and release against one Redis or one Redis Cluster, atomically.

    ``clock`` pins time (seconds since the epoch) for tests and replays; without it the
    scripts use Redis' own clock. ``restore`` returns a user's month from the database
    when Redis has lost it (``(base_tokens, [ModelUsage, ...])``), ``restore_keys`` the
    months of that user's API keys (``[(key id, KeyMonth), ...]``), ``restore_teams`` a
    team's month (a ``TeamMonth``, or None); a ``KeyMonth`` or ``TeamMonth`` whose
    ``day`` is today brings the day counter back too. ``cluster`` defaults
    to whether ``client`` is a ``RedisCluster``.
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
        restore_keys: Callable[[str, str], Any] | None = None,
        restore_teams: Callable[[str, str], Any] | None = None,
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
        #: The months of a user's API keys, restored with the user's (``LoadMonth.api_keys``).
        self.restore_keys_source = restore_keys
        #: A team's month (``LoadTeamMonth``): a ``TeamMonth`` or None.
        self.restore_teams_source = restore_teams
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}

    @property
    def clock(self) -> Callable[[], float] | None:
        return self.ops.clock

    def _run(self, plan: Plan[Any]) -> Any:
        raise NotImplementedError

    def reserve(self, user_id: Any, limits: Limits, estimate: Estimate, **options: Any) -> Any:
        """Reserve ``estimate`` in every limit at once, or refuse (a ``Decision``);
        ``options`` as ``LedgerOps.reserve`` takes them (clamping, the probe)."""
        return self._run(self.ops.reserve(user_id, limits, estimate, **options))

    def settle(self, reservation: Reservation, usage: ActualUsage) -> Any:
        """Replace the estimate by the real usage; a second call changes nothing."""
        return self._run(self.ops.settle(reservation, usage))

    def release(self, reservation: Reservation) -> Any:
        """Give the whole estimate back (a failed call); a second call changes nothing."""
        return self._run(self.ops.release(reservation))

    def renew(self, reservation: Reservation) -> Any:
        """Extend a pending reservation's lease by a TTL from now (its call still runs)."""
        return self._run(self.ops.renew(reservation))

    def usage(self, user_id: Any) -> Any:
        """The user's live counters; lost ones are restored first, as reserve would."""
        return self._run(self.ops.usage(user_id, restore_lost=self.restore_source is not None))

    def key_usage(self, user_id: Any, api_key: Any) -> Any:
        """An API key's live counters (``KeyUsage``)."""
        return self._run(self.ops.key_usage(user_id, api_key))

    def team_usage(self, team: Any) -> Any:
        """A team's live counters (``TeamUsage``); lost ones are restored first."""
        restore_lost = self.restore_teams_source is not None
        return self._run(self.ops.team_usage(team, restore_lost=restore_lost))

    def global_usage(self) -> Any:
        """Everyone's tokens against the global caps, expired shares given back."""
        return self._run(self.ops.global_usage())

    def restore(self, user_id: Any, month: str) -> Any:
        """Add the database's record of ``month`` (and the month before) back, once."""
        return self._run(self.ops.restore(user_id, month))

    def restore_team(self, team: Any, month: str) -> Any:
        """Add the database's record of a team's ``month`` (and the month before) back,
        once per loss."""
        return self._run(self.ops.restore_team(team, month))

    def raise_to_snapshot(
        self, user_id: Any, generation: int, month: str, fields: dict[str, int]
    ) -> Any:
        """Raise the user's settled ``month`` to a snapshot's figures where Redis is
        behind them in the same generation (see ``LedgerOps.raise_to_snapshot``)."""
        return self._run(self.ops.raise_to_snapshot(user_id, generation, month, fields))

    def raise_key(
        self, user_id: Any, key_id: Any, generation: int, month: str, fields: dict[str, int]
    ) -> Any:
        """Raise an API key's settled ``month`` to a snapshot's figures where Redis is
        behind them in the same generation (see ``LedgerOps.raise_key``)."""
        return self._run(self.ops.raise_key(user_id, key_id, generation, month, fields))

    def raise_team(self, team: Any, generation: int, month: str, fields: dict[str, int]) -> Any:
        """Raise a team's settled ``month`` to a snapshot's figures where Redis is
        behind them in the same generation (see ``LedgerOps.raise_team``)."""
        return self._run(self.ops.raise_team(team, generation, month, fields))

    def raise_global(self, day: str, day_total: int, month: str, month_total: int) -> Any:
        """Raise the global caps' day and month to everyone's snapshot figures where
        Redis is behind them (see ``LedgerOps.raise_global``)."""
        return self._run(self.ops.raise_global(day, day_total, month, month_total))

    def reset_period(self, user_id: Any) -> Any:
        """Forgive the user's usage of the current day and month (see ``LedgerOps``)."""
        return self._run(self.ops.reset_period(user_id))

    def burn_resume(self, user_id: Any) -> Any:
        """End the user's burn-rate pause (staff); True if they were paused."""
        return self._run(self.ops.burn_resume(user_id))

    def burn_state(self, user_id: Any) -> Any:
        """The user's burn-rate breaker (a ``BurnState``): paused, baseline, last minute."""
        return self._run(self.ops.burn_state(user_id))

    def key_burn_resume(self, user_id: Any, key_id: Any) -> Any:
        """End an API key's burn-rate pause (staff); True if it was paused."""
        return self._run(self.ops.key_burn_resume(user_id, key_id))

    def team_burn_resume(self, team_id: Any) -> Any:
        """End a team's burn-rate pause (staff); True if it was paused."""
        return self._run(self.ops.team_burn_resume(team_id))

    def key_burn_state(self, user_id: Any, key_id: Any) -> Any:
        """An API key's burn-rate breaker (a ``BurnState``)."""
        return self._run(self.ops.key_burn_state(user_id, key_id))

    def team_burn_state(self, team_id: Any) -> Any:
        """A team's burn-rate breaker (a ``BurnState``)."""
        return self._run(self.ops.team_burn_state(team_id))

    def reset_keys(self, user_id: Any, key_ids: list[Any]) -> Any:
        """Forgive the current day and month of the user's API keys (with the user's)."""
        return self._run(self.ops.reset_keys(user_id, key_ids))

    def reset_team(self, team: Any) -> Any:
        """Forgive a team's current day and month (the admin's team reset)."""
        return self._run(self.ops.reset_team(team))
