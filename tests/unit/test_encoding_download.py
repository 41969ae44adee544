"""Offline, a failed download of a tiktoken encoding is tried once, not once per process:
the marker in tiktoken's cache directory is read by every process that starts after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

#: A process counting with o200k_base, as a worker's first request does.
COUNT = """
import logging
logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
from llm_quota.rules.estimation import count_text, load_encoding
encoding = load_encoding("o200k_base")
assert encoding is not None and load_encoding("o200k_base") is encoding
print(encoding.name, count_text("hello world", encoding))
"""


class DeadProxy:
    """An HTTPS proxy on loopback that hangs up on every connection, as a network without
    DNS fails a download, only at once; it counts the download attempts."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.attempts = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.attempts += 1
            connection.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def offline(tmp_path):
    proxy = DeadProxy()
    yield proxy, tmp_path / "tiktoken-cache"
    proxy.close()


def start_worker(proxy: DeadProxy, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(
        TIKTOKEN_CACHE_DIR=str(cache),
        HTTPS_PROXY=f"http://127.0.0.1:{proxy.port}",
        HTTP_PROXY=f"http://127.0.0.1:{proxy.port}",
    )
    env.pop("DATA_GYM_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", COUNT], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # bpe-openai's copy, verified (tests/unit/test_offline_vocabulary.py), counted
    assert done.stdout == "o200k_base 2\n"
    return done


def warnings_of(done: subprocess.CompletedProcess) -> list[str]:
    return done.stderr.splitlines()


def test_a_failed_download_is_tried_once_then_remembered_by_new_processes(offline):
    proxy, cache = offline
    first = start_worker(proxy, cache)
    assert proxy.attempts == 1
    [line] = warnings_of(first)  # one short line, no traceback
    assert line.startswith("WARNING llm_quota.rules.estimation tiktoken encoding 'o200k_base'")
    assert "Traceback" not in first.stderr and len(line) < 200
    second = start_worker(proxy, cache)
    assert proxy.attempts == 1  # no second download, no wait for the network
    [line] = warnings_of(second)
    assert "download failed" in line and "next download try in" in line


def test_the_download_is_tried_again_after_the_retry_interval(offline):
    from llm_quota.rules.estimation import DOWNLOAD_RETRY_SECONDS

    proxy, cache = offline
    start_worker(proxy, cache)
    [marker] = cache.glob("llm_quota-o200k_base.*")
    marker.write_text(f"{time.time() - DOWNLOAD_RETRY_SECONDS - 1:.3f}\n")
    start_worker(proxy, cache)
    assert proxy.attempts == 2
    start_worker(proxy, cache)
    assert proxy.attempts == 2  # the new failure is remembered in its turn
