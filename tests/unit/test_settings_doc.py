"""The settings page is generated from the declarations, so it cannot drift.

``docs/hooks.py`` (an MkDocs hook) replaces the marker in ``docs/pages/settings.md`` with
a table built from ``llm_quota.conf.SETTINGS`` when the site is built (``make test``
builds it with ``--strict``). These tests hold the generator to every declaration, the
page to its marker, and the README to having no settings table of its own to drift.
"""

from __future__ import annotations

import importlib.util
import re
from decimal import Decimal
from pathlib import Path

import pytest

from llm_quota.conf import SETTINGS, Rule, Setting

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(
    r"^\| `(?P<name>[A-Z_]+)` \| `(?P<default>[^`]*)` \| (?P<rule>.*?) \| (?P<doc>.*) \|$"
)


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = load_hooks()


def rows(table: str) -> list[re.Match]:
    lines = table.splitlines()
    assert lines[:2] == hooks.HEADER.splitlines()
    matches = [ROW.match(line) for line in lines[2:]]
    assert all(matches), [line for line, m in zip(lines[2:], matches, strict=True) if not m]
    return matches


def test_the_generated_table_has_one_row_per_declaration_in_order():
    names = [row["name"] for row in rows(hooks.settings_table(SETTINGS))]
    assert names == [setting.name for setting in SETTINGS]
    assert "TOKEN_REQUESTS_PER_MINUTE" in names  # the key the README's table left out


def test_each_row_holds_the_declared_default_rule_and_doc():
    for setting, row in zip(SETTINGS, rows(hooks.settings_table(SETTINGS)), strict=True):
        assert row["default"] == hooks.shown_default(setting.default), setting.name
        if setting.rule is not None:
            assert row["rule"].startswith(f"`{setting.check_id}`: "), setting.name
        assert row["doc"].startswith(setting.doc.replace("|", "\\|")), setting.name


def test_defaults_are_shown_as_python_source():
    assert hooks.shown_default("llmq") == '"llmq"'
    assert hooks.shown_default(Decimal("2.50")) == 'Decimal("2.50")'
    assert hooks.shown_default(None) == "None"
    assert hooks.shown_default(30.0) == "30.0"


def test_a_new_declaration_appears_in_the_table_without_touching_the_docs():
    extra = Setting(
        "NEW_KEY",
        7,
        "a | pipe in the doc",
        Rule(lambda v: True, "{value!r} is not a number."),
        "llm_quota.E999",
    )
    (row,) = rows(hooks.settings_table([extra]))
    assert row["name"] == "NEW_KEY" and row["default"] == "7"
    assert row["rule"] == "`llm_quota.E999`: `<value>` is not a number."
    assert row["doc"] == "a \\| pipe in the doc"


def test_the_settings_page_holds_the_marker_once_and_renders_every_key():
    page = (ROOT / "docs" / "pages" / "settings.md").read_text()
    assert page.count(hooks.MARKER) == 1
    rendered = hooks.render_settings_page(page)
    assert hooks.MARKER not in rendered
    for setting in SETTINGS:
        assert f"| `{setting.name}` |" in rendered


def test_a_page_without_the_marker_fails_the_build():
    with pytest.raises(ValueError, match="settings-table"):
        hooks.render_settings_page("# Settings\n\nno table here\n")


def test_the_mkdocs_config_runs_the_hook():
    config = (ROOT / "docs" / "mkdocs.yml").read_text()
    assert re.search(r"^hooks:\n  - hooks\.py$", config, re.MULTILINE)


def test_the_readme_keeps_no_settings_table_of_its_own():
    """The README may link the settings page; a table of its own would drift from the
    declarations again, with no test to catch it."""
    readme = (ROOT / "README.md").read_text()
    assert "| key | default |" not in readme
    assert not re.search(r"^\| `[A-Z_]+` \| `", readme, re.MULTILINE)
