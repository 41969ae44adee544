"""A JWT's user across real processes: workers that each cache it (``drf.jwt``).

Every worker serves a warm token from memory, with CONFIG_CACHE_SECONDS at an hour
(the scale site's): a user deactivated or deleted by another process is refused on the
next request by every worker only because the config broadcast told them, on the sync
gateway (gunicorn) and the async one (uvicorn, ``project.asgi``).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.system.test_api_key_processes import chat
from tests.system.test_many_processes import (
    admin,
    gunicorn,
    serving,
    site,  # noqa: F401 - fixtures
    site_db,  # noqa: F401
    spare_port,
    uvicorn,
)

pytestmark = pytest.mark.slow


def burst(url: str, token: str, calls: int = 24) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda _: chat(url, token), range(calls)))


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
@pytest.mark.parametrize(
    ("change", "why"), [("deactivate", "User is inactive"), ("delete", "User not found")]
)
def test_a_user_changed_in_one_process_is_refused_by_every_worker(
    site,  # noqa: F811
    quota_prefix,
    server,
    change,
    why,
):
    pk = admin(site, "seed", f"{quota_prefix}-{change}", "requests_per_minute=1000")
    token = admin(site, "token", pk)
    port = spare_port()
    if server == "gunicorn":
        command = gunicorn(site, 3, port)
    else:
        command = uvicorn(site, 2, port, app="project.asgi:application")
    with serving(command, site, port, f"/policy/{pk}/") as url:
        assert [status for status, _ in burst(url, token)] == [200] * 24  # every worker warm
        admin(site, change, pk)
        after = burst(url, token)
    assert [status for status, _ in after] == [401] * 24, after[:3]
    # simplejwt's own refusal, in OpenAI's shape
    assert {body["error"]["message"] for _, body in after} == {f"Invalid API key: {why}"}
