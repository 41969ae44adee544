"""Whether the environment names a proxy for the upstream calls.

httpx sends through one (``HTTPS_PROXY`` and the like); the gateway's own senders
(``sync_sender`` on sockets, ``async_http`` on aiohttp) do not, so a call goes through
them only where none is set, and through httpx otherwise.
"""

from __future__ import annotations

import os
import urllib.parse

#: Environment variables through which httpx sends its calls via a proxy.
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy")


def direct(base_url: str) -> bool:
    """Whether calls to ``base_url`` may skip httpx: plain HTTP or HTTPS, and no proxy
    in the environment."""
    scheme = urllib.parse.urlsplit(base_url).scheme
    proxied = any(os.environ.get(name) or os.environ.get(name.upper()) for name in PROXY_VARIABLES)
    return scheme in ("http", "https") and not proxied
