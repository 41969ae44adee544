"""``setup.cfg`` keeps its promises: the extras bring what they name (followed through the
installed packages' own metadata, as pip resolves them), and the wheel carries ``py.typed``."""

from __future__ import annotations

import configparser
import importlib
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.dist import Distribution

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


def metadata_of_setup_cfg(monkeypatch) -> Distribution:
    """setup.cfg as setuptools reads it for a build (from the repository root, where
    package discovery runs), without building anything."""
    monkeypatch.chdir(SETUP_CFG.parent)
    dist = Distribution()
    dist.parse_config_files([str(SETUP_CFG)])
    return dist


def test_the_wheel_ships_py_typed(monkeypatch):
    """PEP 561: without ``llm_quota/py.typed`` in the installed package, mypy and pyright
    treat every import of llm_quota as untyped. build_py's own data-file search decides
    what goes into the wheel; package_data alone must carry it (no MANIFEST.in, no SCM
    plugin)."""
    assert (SETUP_CFG.parent / "llm_quota" / "py.typed").is_file()
    dist = metadata_of_setup_cfg(monkeypatch)
    dist.include_package_data = False
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {
        (package, name) for package, _src, _build, names in build_py.data_files for name in names
    }
    assert ("llm_quota", "py.typed") in shipped
    assert ("llm_quota", "ledger/lua/reserve.lua") in shipped
