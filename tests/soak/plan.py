"""What the soak runs: its load's shape, its payers' limits, its Sentinel group."""

MODEL = "gpt-4o"
SERVICE = "llmqsoak"
WORKERS, THREADS = 3, 8
TIER = dict(requests_per_minute=6000, tokens_per_minute=200_000, tokens_per_day=400_000)
KEY_TOKENS_PER_DAY = 300_000  # a key's own budget, beside its user's
TEAM_TOKENS_PER_DAY = 1_200_000  # the team's, shared by its members
MAX_TOKENS = (16, 32, 64)
SNAPSHOT_EVERY = 5.0
#: A Sentinel calls a primary down after this long: more than a SIGKILL's or a SIGSTOP's
#: outage, so only the failover fault fails over.
DOWN_AFTER_MS = 5000
FAULTS = ("redis SIGKILL", "redis SIGSTOP 2 s", "Sentinel failover", "gunicorn worker SIGKILL")
