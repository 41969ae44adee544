"""The settings mypy's Django plugin loads (pyproject.toml ``[tool.django-stubs]``).

Only the app and what its models need: every other setting keeps the type Django's own
stubs give it, so llm_quota is checked against what any host project may configure,
not against the demo's values (and no Redis starts for a type check).
"""

SECRET_KEY = "type-checking-only"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "rest_framework",
    "llm_quota",
]
