"""The README's quickstart, followed as a new user would (issue #13): an install test.

The sdist and the wheel are built (``python -m build``) from a copy of the source, the
wheel is installed into a fresh virtualenv with the extras the README's ``pip install``
names, ``django-admin startproject`` makes a new project, and the README's snippets,
taken from README.md by their markers (``tests/support/readme.py``), are applied as
they are. Then its set-up commands run (``check`` must be clean), the project is served
by ``runserver`` on a free port, and one call goes through each integration style: the
guard, the throttle with the middleware, ``@quota_gated``, the gateway with the official
``openai`` SDK (the README's client snippet), then the usage API, the schema, a refusal
on a tiny budget, and a Celery worker running the snapshot task on the README's app.

Where the test's world differs from a user's (its Redis, its key prefix, the upstream:
``tests/support/oracle_upstream.py``, billing like OpenAI), it sets the environment
variables the README's snippets read; it edits no snippet. pip reaches the package
registry through the machine's pip cache; every step is bounded by a timeout, and its
progress is printed to the terminal.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from tests.support import readme
from tests.support.oracle_upstream import OracleServer
from tests.system.test_many_processes import spare_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "mysite"  # the README's project name
MODEL = "gpt-4o-mini"
PASSWORD = "correct-horse-battery"
#: Not part of the source a user installs, so not copied for the build.
UNBUILT = (".git", ".venv", "var", "build", "dist", "test-artifacts", "*.egg-info",
           "__pycache__", ".pytest_cache", ".ruff_cache", "db.sqlite3")  # fmt: skip
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 40}


class Steps:
    """Runs the install's commands with timeouts, telling the terminal what it does."""

    def __init__(self, capsys: pytest.CaptureFixture[str], log: Path) -> None:
        self.capsys, self.log, self.started = capsys, log, time.monotonic()

    def say(self, message: str) -> None:
        with self.capsys.disabled():
            print(f"\n[install {time.monotonic() - self.started:5.1f}s] {message}", flush=True)

    def run(self, argv: list[str], *, timeout: float, **kwargs) -> str:
        """Run one command to its end; its output goes to the log and into a failure."""
        self.say(" ".join(shlex.quote(str(a)) for a in argv)[:160])
        try:
            done = subprocess.run(
                [str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL, **kwargs,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{argv[:4]} still running after {timeout} s") from exc
        with self.log.open("a") as log:
            log.write(f"$ {argv}\n{done.stdout}\n{done.stderr}\n")
        assert done.returncode == 0, (
            f"{argv[:4]} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        return done.stdout + done.stderr


def built_wheel(steps: Steps, work: Path) -> Path:
    """``python -m build``: the sdist, and the wheel built from it, as a release is."""
    source, dist = work / "source", work / "dist"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*UNBUILT), symlinks=True)
    steps.run([sys.executable, "-m", "build", "--outdir", dist, source], timeout=300)
    assert len(list(dist.glob("django_llm_quota-*.tar.gz"))) == 1
    (wheel,) = dist.glob("django_llm_quota-*-py3-none-any.whl")
    return wheel


def pip_arguments(wheel: Path) -> list[str]:
    """The README's ``pip install`` line, with the built wheel for the package's name."""
    (argv,) = readme.commands("pip")
    assert argv[:2] == ["pip", "install"], argv
    named = [a for a in argv[2:] if a.startswith("django-llm-quota")]
    assert named, f"the README's pip line installs no django-llm-quota: {argv}"
    return [a.replace("django-llm-quota", str(wheel), 1) if a in named else a for a in argv[2:]]


def fresh_project(steps: Steps, work: Path, bin_dir: Path) -> Path:
    """``startproject``, then the README's snippets: settings appended, files written."""
    site = work / "site"
    site.mkdir()
    steps.run([bin_dir / "django-admin", "startproject", PROJECT, site], timeout=60)
    package = site / PROJECT
    settings_file = package / "settings.py"
    settings_file.write_text(settings_file.read_text() + "\n" + readme.snippet("settings") + "\n")
    for name, filename in [("urls", "urls.py"), ("views", "views.py"),
                           ("celery", "celery.py"), ("celery-init", "__init__.py")]:  # fmt: skip
        (package / filename).write_text(readme.snippet(name) + "\n")
    return site


def environment(bin_dir: Path, prefix: str, upstream: str) -> dict[str, str]:
    """The user's shell, pointed at the test's Redis, key prefix and upstream."""
    redis_url = settings.REDIS_URL
    broker = (
        "redis+socket://" + redis_url.removeprefix("unix://")
        if redis_url.startswith("unix://")
        else redis_url
    )
    env = {k: v for k, v in os.environ.items()
           if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "DATABASE_URL")}  # fmt: skip
    return env | {
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": str(bin_dir.parent),
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": broker,
        "LLM_QUOTA_KEY_PREFIX": prefix,
        "OPENAI_BASE_URL": upstream,
        "OPENAI_API_KEY": "sk-install-test",
        "PYTHONUNBUFFERED": "1",
    }


@contextmanager
def process(argv: list, log: Path, **kwargs):
    """A server or worker for the block's length, its output in ``log``; its whole
    process group ends with it."""
    with log.open("a") as output:
        proc = subprocess.Popen(
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True, **kwargs,
        )  # fmt: skip
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_client_snippet(site_url: str) -> dict:
    """The README's gateway client, run here (this venv has ``openai``) against the site:
    only its site address and the password it cannot know are changed."""
    code = readme.snippet("client")
    for pattern, value in [(r'^SITE = ".*"$', f"SITE = {site_url!r}"),
                           (r'"password": "[^"]*"', f'"password": {PASSWORD!r}')]:  # fmt: skip
        code, count = re.subn(pattern, value, code, flags=re.M)
        assert count == 1, f"the README's client snippet has no {pattern!r}"
    namespace: dict = {}
    exec(compile(code, "README.md:install:client", "exec"), namespace)  # noqa: S102
    return namespace


def shell(steps: Steps, python: Path, code: str, **kwargs) -> str:
    return steps.run([python, "manage.py", "shell", "-c", code], timeout=120, **kwargs)


@pytest.fixture
def celery_queue_name(redis_client, quota_prefix):
    """A queue of the test's own (the shared broker may serve other workers); after the
    test, every key of its prefix (``<prefix>:``, and the token endpoint's ``<prefix>-ip:``)
    and of its queue is deleted, and nothing else."""
    queue = f"llmq-install-{uuid.uuid4().hex[:10]}"
    yield queue
    for pattern in (f"{quota_prefix}*", f"_kombu.binding*{queue}"):
        keys = list(redis_client.scan_iter(match=pattern, count=1000))
        if keys:
            redis_client.delete(*keys)


@pytest.fixture
def work():
    """The install's folder (source copy, wheel, venv, project: about 200 MB), removed
    after the test however it ends; failures carry the output they need."""
    with tempfile.TemporaryDirectory(prefix="llmq-install-") as folder:
        yield Path(folder)


@pytest.fixture
def oracle():
    """The project's upstream: bills every call as OpenAI does and records it."""
    server = OracleServer().start()
    yield server
    server.stop()


def test_the_readme_quickstart_installs_and_serves_every_style(
    work, quota_prefix, celery_queue_name, oracle, capsys
):
    if settings.REDIS_URL.startswith(("redis+cluster://", "rediss+cluster://")):
        pytest.skip("the quickstart's django-redis cache needs a plain Redis, not a cluster")
    steps = Steps(capsys, work / "install.log")
    wheel = built_wheel(steps, work)
    bin_dir = fresh_venv(steps, work / "venv", pip_arguments(wheel))
    python = bin_dir / "python"
    site = fresh_project(steps, work, bin_dir)
    in_site = {"cwd": site, "env": environment(bin_dir, quota_prefix, oracle.url)}

    for argv in readme.commands("setup"):
        assert argv[0] == "python", f"a setup step the test cannot run: {argv}"
        output = steps.run([python, *argv[1:]], timeout=180, **in_site)
        if argv[1:3] == ["manage.py", "check"]:
            assert "System check identified no issues" in output, output
            assert "WARNING" not in output and "ERROR" not in output, output
    shell(steps, python, (
        "from django.contrib.auth import get_user_model\n"
        "from llm_quota.models import Tier, UserQuota\n"
        "User = get_user_model()\n"
        f"User.objects.create_user('alice', password={PASSWORD!r})\n"
        f"bob = User.objects.create_user('bob', password={PASSWORD!r})\n"
        "tiny = Tier.objects.create(name='tiny', tokens_per_day=1)\n"
        "UserQuota.objects.create(user=bob, tier=tiny)\n"
    ), **in_site)  # fmt: skip

    port, log = spare_port(), work / "runserver.log"
    served = [python, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
    with process(served, log, **in_site) as server:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/v1/models", server, log)
        steps.say(f"serving {url}; one call through each style")
        calls_through_every_style(url, oracle)
        refusals_on_a_tiny_budget(url)
        the_schema_describes_the_api(url, log)

    snapshot_by_a_celery_worker(
        steps, python, bin_dir, work / "celery.log", celery_queue_name, in_site
    )
    steps.say("done")


def fresh_venv(steps: Steps, venv: Path, requirements: list[str]) -> Path:
    """``python -m venv``, then the README's ``pip install``; the venv's ``bin``."""
    steps.run([sys.executable, "-m", "venv", venv], timeout=120)
    python = venv / "bin" / "python"
    pip = [python, "-m", "pip", "install", "--progress-bar", "off", "--timeout", "60"]
    steps.run([*pip, *requirements], timeout=600)
    return venv / "bin"


def the_schema_describes_the_api(url: str, log: Path) -> None:
    """``/api/schema/`` answers in the host project with the gateway, the usage API and
    the project's own views, and drf-spectacular complains about none of them."""
    schema = httpx.get(f"{url}/api/schema/", timeout=30)
    assert schema.status_code == 200, schema.text[:2000]
    for route in ("/v1/chat/completions", "/api/llm-quota/usage/", "/summaries/guarded/"):
        assert route in schema.text, f"{route} missing from the schema"
    complaints = re.findall(r".*(?:Error|Warning) \[.*", log.read_text())
    assert not complaints, complaints


def token(url: str, username: str) -> dict[str, str]:
    answer = httpx.post(
        f"{url}/api/token/", json={"username": username, "password": PASSWORD}, timeout=30
    )
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Bearer {answer.json()['access']}"}


def calls_through_every_style(url: str, oracle: OracleServer) -> None:
    """alice's call through each style is answered from the upstream and charged its usage."""
    alice = token(url, "alice")
    guarded = httpx.post(f"{url}/summaries/guarded/", json={"text": "Tea is a drink."},
                         headers=alice, timeout=60)  # fmt: skip
    assert guarded.status_code == 200, guarded.text
    assert guarded.json()["summary"]

    throttled = httpx.post(f"{url}/summaries/throttled/", json=CHAT, headers=alice, timeout=60)
    assert throttled.status_code == 200, throttled.text
    assert throttled.json()["choices"][0]["message"]["content"]
    assert int(throttled.headers["x-ratelimit-remaining-requests"]) >= 0

    gated = httpx.post(f"{url}/summaries/gated/", json=CHAT, headers=alice, timeout=60)
    assert gated.status_code == 200, gated.text
    assert gated.json()["summary"]

    client = run_client_snippet(url)
    reply = client["reply"]
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0
    assert client["usage"].status_code == 200, client["usage"].text

    assert len(oracle.bills) == 4, "each style calls the upstream once"
    report = httpx.get(f"{url}/api/llm-quota/usage/", headers=alice, timeout=30).json()
    (by_model,) = report["by_model"]
    assert by_model["model"] == MODEL
    assert by_model["requests"] == 4
    billed = [usage for _body, usage in oracle.bills]
    assert by_model["input_tokens"] == sum(u["prompt_tokens"] for u in billed)
    assert by_model["output_tokens"] == sum(u["completion_tokens"] for u in billed)
    assert report["usage"]["reserved"] == 0
    assert report["usage"]["tokens_today"] == by_model["base_tokens"] > 0


def refusals_on_a_tiny_budget(url: str) -> None:
    """bob's tier allows 1 base token a day: every style refuses him with a 429 that says
    which limit and when to come back, before the upstream is called."""
    bob = token(url, "bob")
    for path, body in [("/summaries/guarded/", {"text": "Tea is a drink."}),
                       ("/summaries/throttled/", CHAT), ("/summaries/gated/", CHAT),
                       ("/v1/chat/completions", CHAT)]:  # fmt: skip
        refused = httpx.post(f"{url}{path}", json=body, headers=bob, timeout=30)
        assert refused.status_code == 429, (path, refused.status_code, refused.text)
        assert int(refused.headers["Retry-After"]) >= 1, path
        assert refused.headers.get("x-should-retry") == "false", (path, refused.headers)
        assert "tokens_per_day" in refused.text, (path, refused.text)


def snapshot_by_a_celery_worker(
    steps: Steps, python: Path, bin_dir: Path, log: Path, queue: str, in_site: dict
) -> None:
    """The README's Celery app: its beat schedule holds the snapshot, and a worker on the
    README's broker runs it, copying alice's usage into ``UsageSnapshot``."""
    worker = [bin_dir / "celery", "-A", PROJECT, "worker", "--pool", "solo", "-Q", queue,
              "--loglevel", "info", "--without-heartbeat", "--without-mingle",
              "--without-gossip"]  # fmt: skip
    with process(worker, log, **in_site):
        steps.say("celery worker started; sending the snapshot task")
        out = shell(steps, python, (
            "import time\n"
            f"from {PROJECT}.celery import app\n"
            "from llm_quota.models import UsageSnapshot\n"
            "from llm_quota.tasks import SNAPSHOT_TASK\n"
            "entry = app.conf.beat_schedule['llm-quota-snapshot']\n"
            "assert entry['task'] == SNAPSHOT_TASK, entry\n"
            f"app.send_task(SNAPSHOT_TASK, queue={queue!r})\n"
            "deadline = time.monotonic() + 60\n"
            "while not UsageSnapshot.objects.exists() and time.monotonic() < deadline:\n"
            "    time.sleep(0.5)\n"
            "print('SNAPSHOTS', list(UsageSnapshot.objects.values("
            "'user__username', 'model', 'requests')))\n"
        ), **in_site)  # fmt: skip
    rows = json.loads(out.split("SNAPSHOTS ", 1)[1].splitlines()[0].replace("'", '"'))
    assert rows == [{"user__username": "alice", "model": MODEL, "requests": 4}], out
