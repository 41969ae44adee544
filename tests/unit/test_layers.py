"""The layout's promises: layers point down, no import cycles, a core free of HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "llm_quota"

#: The core and the ledger know nothing of HTTP: no request, response or view type.
#: ``rest_framework.exceptions`` stays allowed, for the exception bases promised to
#: DRF users (refusals render as DRF throttles and permission errors).
HTTP_FREE = ("rules", "ledger", "quota", "shapes")
HTTP_MODULES = ("django.http", "django.views", "django.urls", "rest_framework.")
ALLOWED = ("rest_framework.exceptions",)


def test_import_contracts_are_kept():
    """pyproject.toml's import-linter contracts: layers, acyclic, no upward glue."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_core_and_ledger_import_nothing_of_http():
    offenders = []
    for layer in HTTP_FREE:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for name in _imports(path):
                if name.startswith(HTTP_MODULES) and not name.startswith(ALLOWED):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)
