# Each target makes its own virtualenv in .venv (Python 3.11) on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs bench bench-peers loadtest soak clean

$(STAMP): requirements.txt setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

DEMO_ADDR ?= 127.0.0.1:8000

# The Celery worker and beat (usage snapshots, alert webhooks) run beside the
# server and are stopped with it (Ctrl-C).
demo: $(STAMP)
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py demo_seed
	@trap 'kill $$worker $$beat 2>/dev/null; wait; \
	       [ -n "$$REDIS_URL" ] || $(BIN)/python -m project.embedded_redis' EXIT; \
	trap 'exit 130' INT TERM; \
	$(BIN)/celery -A project worker --loglevel=info --concurrency=1 & worker=$$!; \
	$(BIN)/celery -A project beat --loglevel=info & beat=$$!; \
	$(BIN)/python manage.py runserver $(DEMO_ADDR)

# mypy (settings in pyproject.toml): about 40 s cold, 2 s with its cache in .venv.
# The docs site is built with --strict (a broken link or a settings page whose
# marker is gone fails), into a temporary folder that is removed afterwards.
# Last, the chaos soak for one minute (about 90 s with its set-up): the same
# invariants as `make soak`'s ten minutes (docs/pages/reliability.md).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	site=$$(mktemp -d) && trap 'rm -rf "$$site"' EXIT && \
	  $(BIN)/mkdocs build --strict --quiet -f docs/mkdocs.yml -d "$$site"
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m tests.soak --seconds 60

# The docs site in var/site (ignored by git); open var/site/index.html.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict -f docs/mkdocs.yml -d $(CURDIR)/var/site

# The unit group alone (tests/unit): no Redis, no server, seconds. REDIS_URL points
# where nothing listens, so no embedded Redis starts either; a unit test that opens a
# Redis connection fails.
test-fast: $(STAMP)
	REDIS_URL=redis://127.0.0.1:1/0 $(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Benchmarks against REDIS_URL (else the embedded Redis); not part of `make test`.
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks $(BENCH_ARGS)

# The gateway beside the LiteLLM proxy (docs/pages/benchmarks.md), in one run. LiteLLM
# goes into its own virtualenv, never the app's; the stamp makes a second run install
# nothing. `make bench-peers PEERS_ARGS=--quick` for a few minutes' run.
PEERS_VENV := var/peers-venv
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_REQUIREMENTS := tests/benchmarks/peers/requirements.txt

$(PEERS_STAMP): $(PEERS_REQUIREMENTS)
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/pip install --quiet -r $(PEERS_REQUIREMENTS)
	touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python -m tests.benchmarks.peers $(PEERS_ARGS)

# Bounded load (5,000 requests, 64 at once) through gunicorn; not part of `make test`.
loadtest: $(STAMP)
	$(BIN)/python -m tests.loadtest $(LOADTEST_ARGS)

# The chaos soak: load through gunicorn while the Redis primary (under Sentinel) and
# the workers are killed, frozen and failed over at random, then every invariant
# checked per user, API key and team and a table printed
# (docs/pages/reliability.md). 10 minutes; `make soak SOAK_ARGS="--seconds 60"`.
soak: $(STAMP)
	$(BIN)/python -m tests.soak $(SOAK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check llm_quota
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var db.sqlite3 .pytest_cache
