"""``setup.cfg`` keeps its promises: the extras bring what they name (followed through the
installed packages' own metadata, as pip resolves them), the wheel carries ``py.typed``,
and the classifiers claim what the suite runs on."""

from __future__ import annotations

import configparser
import importlib
import sys
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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


def test_the_asgi_extra_brings_uvloop_for_the_uvicorn_recipe():
    """The recipe names ``--loop uvloop``: on asyncio's loop, uvicorn's ``--workers N``
    leaves ``TCP_NODELAY`` off and Nagle stalls every keep-alive request (operations.md)."""
    brought = brought_by(extra("asgi"))
    assert {"uvicorn", "uvloop", "httptools"} <= brought, brought


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


def test_classifiers_say_what_is_tested(monkeypatch):
    """The classifiers claim only what the suite runs on: the Django series install_requires
    pins, the Python it runs under, the license declared, and typing only with py.typed."""
    dist = metadata_of_setup_cfg(monkeypatch)
    classifiers = set(dist.metadata.classifiers)

    django = next(r for r in map(Requirement, dist.install_requires) if r.name == "django")
    series = {c.rsplit(" :: ", 1)[1] for c in classifiers if c.startswith("Framework :: Django ::")}
    assert series, "no Framework :: Django :: <version> classifier"
    for version in series:
        assert django.specifier.contains(f"{version}.0"), (version, django)
    assert "Framework :: Django" in classifiers

    pythons = {
        c.rsplit(" :: ", 1)[1]
        for c in classifiers
        if c.startswith("Programming Language :: Python :: 3.")
    }
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert running in pythons, (running, pythons)
    python_requires = SpecifierSet(str(dist.python_requires))
    assert all(python_requires.contains(f"{v}.0") for v in pythons), pythons

    assert dist.metadata.license == "MIT"
    assert "License :: OSI Approved :: MIT License" in classifiers
    assert "Typing :: Typed" in classifiers
    assert any(c.startswith("Development Status :: ") for c in classifiers)


def test_the_upgrade_notes_name_every_migration():
    """Upgrading means migrating: each migration a release adds is named in the upgrade
    notes (docs/pages/upgrading.md), so a user reading them knows what ``migrate`` will
    change."""
    root = SETUP_CFG.parent
    notes = (root / "docs" / "pages" / "upgrading.md").read_text()
    migrations = sorted(p.stem for p in (root / "llm_quota" / "migrations").glob("0*.py"))
    missing = [m for m in migrations if m != "0001_initial" and m not in notes]
    assert not missing, missing


def test_the_offline_exact_extra_brings_the_vocabulary_the_estimator_reads():
    """``[offline-exact]`` names the package whose data ``rules.estimation`` looks for, and
    the pinned version (requirements.txt) has both encodings OpenAI's current models use."""
    from llm_quota.rules import estimation

    [requirement] = [Requirement(line) for line in extra("offline-exact")]
    assert canonicalize_name(requirement.name) == canonicalize_name(estimation.BUNDLE_PACKAGE)
    for name in ("o200k_base", "cl100k_base"):
        assert estimation._bundled_file(name) is not None, name
