"""A real browser in the admin: log in, edit a tier's monthly budget, see the charts.

Playwright drives Debian's ``chromium`` package (installed here with apt when it is
missing; Playwright's own browser download is never used). The screenshot is kept
in ``test-artifacts/`` for a human to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model

from llm_quota import quota_guard
from llm_quota.models import ModelPrice, Tier, UsageSnapshot, UserQuota
from llm_quota.reporting.snapshot import snapshot_usage
from tests.support import factories, periods

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = pytest.mark.slow


def _apt_get(*args: str) -> subprocess.CompletedProcess:
    command = ["apt-get", "-o", "DPkg::Lock::Timeout=600", *args]
    if os.geteuid() != 0 and shutil.which("sudo"):
        command = ["sudo", "-n", *command]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt on first use."""
    if not CHROMIUM.exists():
        install = ("install", "-y", "--no-install-recommends", "chromium")
        result = _apt_get(*install)
        if result.returncode != 0:  # a stale package list: refresh it once
            _apt_get("update")
            result = _apt_get(*install)
        if not CHROMIUM.exists():
            pytest.skip(f"chromium could not be installed with apt: {result.stderr[-500:]}")
    return str(CHROMIUM)


@pytest.fixture
def usage_data(ledger, clock):
    """Tiers, prices, a superuser and a few months of usage to chart."""
    factories.price("gpt-4o", "1", "4", default_max_output_tokens=500)
    factories.price("gpt-4o-mini", "0.06", "0.24", default_max_output_tokens=500)
    pro = factories.tier("pro", tokens_per_month=2_000_000)
    free = factories.tier("free", tokens_per_month=500_000, is_default=True, upgrade_to=pro)
    get_user_model().objects.create_superuser("boss", "boss@example.com", "pw-boss-123")
    users = [factories.user(free if i % 2 else pro) for i in range(6)]
    for i, user in enumerate(users):
        for _ in range(1 + i):
            for model, prompt, out in (("gpt-4o", 2000 * (i + 1), 400), ("gpt-4o-mini", 9000, 800)):
                with quota_guard(user, model=model, prompt_tokens=prompt, max_tokens=out) as q:
                    q.settle({"prompt_tokens": prompt, "completion_tokens": out})
    snapshot_usage(ledger=ledger)
    # Earlier months, as the snapshots of those months left them.
    for n, back in enumerate(range(6, 0, -1)):
        for i, user in enumerate(users):
            for model, base in (("gpt-4o", 9000 * (n + 2) * (i + 1)), ("gpt-4o-mini", 4000 * n)):
                UsageSnapshot.objects.create(
                    user=user, period=periods.month_start(clock, back), model=model,
                    requests=10 + n, input_tokens=base // 2, output_tokens=base // 8,
                    base_tokens=base,
                )  # fmt: skip
    return free


@pytest.mark.django_db(transaction=True)
def test_admin_logs_in_edits_a_budget_and_sees_the_usage_chart(
    chromium, live_server, usage_data, clock
):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "admin-usage-report.png"
    free = usage_data
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{live_server.url}/admin/login/")
            page.fill("#id_username", "boss")
            page.fill("#id_password", "pw-boss-123")
            page.click("input[type=submit]")
            page.wait_for_selector("#user-tools")

            page.goto(f"{live_server.url}/admin/llm_quota/tier/{free.pk}/change/")
            page.fill("#id_tokens_per_month", "750000")
            page.click("input[name=_save]")
            page.wait_for_selector(".messagelist .success")
            saved = page.inner_text(".messagelist")

            page.goto(f"{live_server.url}/admin/llm_quota/usagesnapshot/")
            page.click("text=Usage charts")
            page.wait_for_selector("svg.llmq-chart")
            charts = page.locator("svg.llmq-chart")
            chart_count = charts.count()
            spend_box = charts.nth(0).bounding_box()
            bars = page.locator("#spend-over-time svg rect").count()
            heading = page.inner_text("#per-model h2")
            page.screenshot(path=str(shot), full_page=True)

            page.goto(f"{live_server.url}/admin/llm_quota/userquota/")
            page.wait_for_selector("#result_list")
            live_columns = page.inner_text("#result_list thead")
            page.screenshot(path=str(ARTIFACTS / "admin-user-quotas.png"), full_page=True)
            page.click("#result_list tbody tr:first-child th a")
            page.wait_for_selector(".field-live_usage")
            live_detail = page.inner_text(".field-live_usage")
            page.screenshot(path=str(ARTIFACTS / "admin-user-quota-live.png"), full_page=True)
        finally:
            browser.close()

    assert "was changed successfully" in saved
    assert Tier.objects.get(pk=free.pk).tokens_per_month == 750_000
    assert chart_count == 3
    assert spend_box["width"] > 400 and spend_box["height"] > 150  # drawn, not collapsed
    assert bars >= 12  # seven months of stacked bars, plus the legend swatches
    assert heading.startswith(f"{periods.month_start(clock):%B %Y} by model")
    assert shot.stat().st_size > 20_000
    assert "TODAY" in live_columns.upper() and "THIS MONTH" in live_columns.upper()
    assert "Not yet snapshotted" in live_detail


#: Every table on the page fits its box, and no cell is narrower than its content
#: (a clipped column scrolls or hides its text); the page itself has no sideways scroll.
CLIPPED = """() => {
  const found = [];
  const page = document.documentElement;
  if (page.scrollWidth > page.clientWidth)
    found.push(`page: ${page.scrollWidth} > ${page.clientWidth}`);
  for (const table of document.querySelectorAll('#content table')) {
    const box = table.parentElement;
    const name = table.id || box.className || box.tagName;
    if (table.scrollWidth > box.clientWidth)
      found.push(`table ${name}: ${table.scrollWidth} > ${box.clientWidth}`);
    for (const cell of table.querySelectorAll('th, td')) {
      if (cell.scrollWidth > cell.clientWidth + 1)
        found.push(`${name} cell "${cell.textContent.trim().slice(0, 30)}": ` +
                   `${cell.scrollWidth} > ${cell.clientWidth}`);
    }
  }
  return found;
}"""


@pytest.mark.django_db(transaction=True)
def test_every_admin_page_is_screenshot_at_1280_px_with_no_column_clipped(
    chromium, live_server, usage_data
):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    free = usage_data
    newcomer = get_user_model().objects.create_user(
        "newcomer.with.a.long.name", "newcomer.with.a.long.name@example.com", "pw-123456"
    )  # no user quota: on the default tier
    capped = factories.user(free, tokens_per_day=20_000, blocked=True)
    price = ModelPrice.objects.get(model="gpt-4o")
    quota = UserQuota.objects.get(user=capped)
    base = f"{live_server.url}/admin/llm_quota"
    pages = {
        "tiers": f"{base}/tier/",
        "tier-form": f"{base}/tier/{free.pk}/change/",
        "prices": f"{base}/modelprice/",
        "price-form": f"{base}/modelprice/{price.pk}/change/",
        "users": f"{base}/quotauser/",
        "user-page": f"{base}/quotauser/{newcomer.pk}/change/",
        "user-page-with-quota": f"{base}/quotauser/{capped.pk}/change/",
        "user-quotas": f"{base}/userquota/",
        "user-quota-form": f"{base}/userquota/{quota.pk}/change/",
        "user-quota-add": f"{base}/userquota/add/?user={newcomer.pk}",
        "snapshots": f"{base}/usagesnapshot/",
        "report": f"{base}/usagesnapshot/report/",
    }
    clipped: dict[str, list[str]] = {}
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{live_server.url}/admin/login/")
            page.fill("#id_username", "boss")
            page.fill("#id_password", "pw-boss-123")
            page.click("input[type=submit]")
            page.wait_for_selector("#user-tools")
            for name, url in pages.items():
                response = page.goto(url)
                assert response is not None and response.status == 200, (name, url)
                page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
                clipped[name] = page.evaluate(CLIPPED)
                page.screenshot(path=str(ARTIFACTS / f"admin-{name}.png"), full_page=True)
            # The reset's confirmation page: two users selected, the action chosen.
            page.goto(pages["user-quotas"])
            page.locator("#result_list tbody input.action-select").nth(0).check()
            page.locator("#result_list tbody input.action-select").nth(1).check()
            page.select_option("select[name=action]", "reset_period_usage")
            page.click("button[name=index]")
            page.wait_for_selector("text=Yes, I’m sure")
            clipped["reset-confirmation"] = page.evaluate(CLIPPED)
            page.screenshot(path=str(ARTIFACTS / "admin-reset-confirmation.png"), full_page=True)
            users_text = page.goto(pages["users"]) and page.inner_text("#result_list")
        finally:
            browser.close()

    assert {name: found for name, found in clipped.items() if found} == {}
    assert newcomer.username in users_text  # no user quota, still listed
    assert all((ARTIFACTS / f"admin-{name}.png").stat().st_size > 10_000 for name in clipped)
