"""The demo project's settings, with test views and caches only a broadcast refreshes."""

from project.settings import *  # noqa: F403
from project.settings import LLM_QUOTA

ROOT_URLCONF = "tests.system.scale_site.urls"
ALLOWED_HOSTS = ["*"]
DEBUG = False
# An hour: a worker that shows an edited tier learned of it from the broadcast.
LLM_QUOTA = {**LLM_QUOTA, "CONFIG_CACHE_SECONDS": 3600}
LOGGING = {"version": 1, "disable_existing_loggers": False}
