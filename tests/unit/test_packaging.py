"""The extras of ``setup.cfg`` bring what they promise: followed through the installed
packages' own metadata, as pip resolves them."""

from __future__ import annotations

import configparser
import importlib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def extra(name: str) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(SETUP_CFG)
    lines = parser["options.extras_require"].get(name, "").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def brought_by(requirements: list[str]) -> set[str]:
    """Every distribution the requirements name, their extras followed transitively."""
    seen: set[tuple[str, str]] = set()
    todo = [Requirement(line) for line in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for wanted in req.extras or {""}:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            try:
                declared = requires(name) or []
            except PackageNotFoundError:
                continue
            for line in declared:
                dep = Requirement(line)
                if wanted and dep.marker and "extra" in str(dep.marker):
                    if dep.marker.evaluate({"extra": wanted}):
                        todo.append(dep)
    return {name for name, _ in seen}


def test_the_celery_extra_brings_the_redis_broker_client():
    """Without kombu's ``redis`` extra a worker on a Redis broker died at start:
    ``kombu.transport.redis`` imports ``redis`` and ``packaging``."""
    brought = brought_by(extra("celery"))
    assert {"celery", "kombu", "redis", "packaging"} <= brought, brought
    importlib.import_module("kombu.transport.redis")
