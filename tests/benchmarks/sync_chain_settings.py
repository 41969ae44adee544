from project.settings import *  # noqa: F403

MIDDLEWARE = [
    f"tests.benchmarks.sync_chain.{path.rsplit('.', 1)[1]}" if path.startswith("django.") else path
    for path in MIDDLEWARE  # noqa: F405
]
