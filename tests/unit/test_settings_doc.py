"""The README's settings table is the settings' documentation: it must say what
``llm_quota/conf.py`` declares, key by key (name, default and doc, in the same order)."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Any

from llm_quota.conf import SETTINGS

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(?P<name>[A-Z_]+)` \| `(?P<default>[^`]*)` \| (?P<doc>.*) \|$")


def shown(default: Any) -> str:
    """A default as the README writes it: strings in double quotes, a Decimal by its
    constructor, everything else by ``repr``."""
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, Decimal):
        return f'Decimal("{default}")'
    return repr(default)


def readme_rows() -> list[tuple[str, str, str]]:
    section = README.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = section.split("| key | default | meaning |\n|---|---|---|\n", 1)[1]
    rows = []
    for line in table.split("\n\n", 1)[0].splitlines():
        match = ROW.match(line)
        assert match, f"a settings row the test cannot read: {line!r}"
        rows.append((match["name"], match["default"], match["doc"]))
    return rows


def test_the_readme_lists_every_declared_setting_in_order():
    assert [name for name, _, _ in readme_rows()] == [setting.name for setting in SETTINGS]


def test_each_readme_default_is_the_declared_default():
    declared = {setting.name: shown(setting.default) for setting in SETTINGS}
    for name, default, _ in readme_rows():
        assert default == declared[name], name


def test_each_readme_meaning_is_the_declared_doc():
    declared = {setting.name: setting.doc for setting in SETTINGS}
    for name, _, doc in readme_rows():
        assert doc == declared[name], name
