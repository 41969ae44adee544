"""The demo project's settings plus section 4's ungated baseline URL (bench-only)."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "tests.benchmarks.ungated"
