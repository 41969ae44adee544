"""Loopback ports for the servers a test starts.

The kernel picks a free one, unless ``LLMQ_TEST_PORTS`` ("27300-27399") gives a range:
on a machine shared by several test runs, each keeps its servers to its own range.
"""

from __future__ import annotations

import os
import socket
from contextlib import closing


def spare_port() -> int:
    """A port free on 127.0.0.1 now: the first free one of ``LLMQ_TEST_PORTS``, else the
    kernel's choice."""
    first, _, last = os.environ.get("LLMQ_TEST_PORTS", "0-0").partition("-")
    for port in range(int(first), int(last or first) + 1):
        with closing(socket.socket()) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError(f"no free port in LLMQ_TEST_PORTS={os.environ['LLMQ_TEST_PORTS']}")
