"""A primary, one replica and three Sentinels (quorum 2) on private loopback ports: what
``test_sentinel_failover`` and the chaos soak run the ledger on.

``SentinelGroup.start()`` returns once the replica is in sync and each Sentinel knows the
replica and the other two; ``stop()`` stops whatever started. ``primary()`` is the server
the Sentinels name primary now (after a failover, the former replica).
"""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.support.redis_server import RedisServer, free_port, wait_for


class SentinelGroup:
    def __init__(
        self,
        workdir: Path,
        service: str,
        *,
        down_after_ms: int = 1000,
        durable: bool = False,
    ) -> None:
        self.dir, self.service = workdir, service
        self.down_after_ms, self.durable = down_after_ms, durable
        self.servers: list[RedisServer] = []  # the primary, then the replica
        self.sentinels: list[RedisServer] = []

    def _start(self, name: str, **options) -> RedisServer:
        server = RedisServer(self.dir / name, port=free_port(), **options).start()
        (self.sentinels if "watch" in options else self.servers).append(server)
        return server

    def start(self) -> SentinelGroup:
        try:
            primary = self._start("primary", durable=self.durable)
            replica = self._start("replica", durable=self.durable, replica_of=primary)
            wait_for(
                lambda: replica.client().info("replication")["master_link_status"] == "up",
                "the replica's sync",
            )
            for n in range(3):
                self._start(f"sentinel{n}", watch=primary, service=self.service, quorum=2,
                            down_after_ms=self.down_after_ms)  # fmt: skip
            for sentinel in self.sentinels:  # each knows the replica and the other two
                client = sentinel.client()
                wait_for(lambda c=client: c.sentinel_slaves(self.service), "the Sentinels' replica")
                wait_for(
                    lambda c=client: len(c.sentinel_sentinels(self.service)) == 2, "the Sentinels"
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for server in reversed(self.servers + self.sentinels):
            server.stop()

    @property
    def sentinel_ports(self) -> list[int]:
        return [sentinel.port for sentinel in self.sentinels]

    def named_primaries(self) -> set[int]:
        """The primary's port as each Sentinel that answers names it."""
        ports = set()
        for sentinel in self.sentinels:
            try:
                address = sentinel.client().sentinel_get_master_addr_by_name(self.service)
            except redis.RedisError:
                continue
            ports.add(int(address[1]))
        return ports

    def primary(self) -> RedisServer:
        """The server the Sentinels name primary (the first answer, if they disagree)."""
        port = next(iter(self.named_primaries()))
        return next(server for server in self.servers if server.port == port)

    def fail_over(self, timeout: float = 60) -> RedisServer:
        """``SENTINEL FAILOVER`` (a Sentinel promotes the replica without waiting for the
        primary to fail), then until every Sentinel names the new primary and the former
        one follows it, in sync: the failover is over, and a next one could start.
        Returns the new primary."""
        old = self.primary()
        new = next(server for server in self.servers if server is not old)
        deadline = time.monotonic() + timeout
        while True:  # a replica just resynced is not yet "good" to a Sentinel: retry
            try:
                self.sentinels[0].client().execute_command("SENTINEL FAILOVER", self.service)
                break
            except redis.ResponseError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

        def over() -> bool:
            link = old.client().info("replication")
            return (
                self.named_primaries() == {new.port}
                and link.get("role") == "slave"
                and int(link.get("master_port", 0)) == new.port
                and link.get("master_link_status") == "up"
            )

        wait_for(over, "the failover's end", timeout=max(1.0, deadline - time.monotonic()))
        return new
