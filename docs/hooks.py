"""MkDocs hook: the settings page's table is built from ``llm_quota/conf.py`` at build time.

Each ``LLM_QUOTA`` key is declared once, in ``llm_quota.conf.SETTINGS`` (default, rule,
doc). A table written by hand drifted from it (``TOKEN_REQUESTS_PER_MINUTE`` went
missing from a table said to be complete), so ``pages/settings.md`` holds only a marker
and this hook puts the table there. A page that lost the marker fails the build.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

#: The repository, whose ``llm_quota`` the hook reads (no Django settings needed).
ROOT = Path(__file__).resolve().parents[1]

#: The line in ``pages/settings.md`` that the table replaces.
MARKER = "<!-- settings-table -->"
SETTINGS_PAGE = "settings.md"
HEADER = "| key | default | `manage.py check` | meaning |\n|---|---|---|---|"


def shown_default(default: Any) -> str:
    """A default as Python source: strings in double quotes, a Decimal by its
    constructor, everything else by ``repr``."""
    if isinstance(default, str):
        return f'"{default}"'
    if isinstance(default, Decimal):
        return f'Decimal("{default}")'
    return repr(default)


def shown_rule(setting: Any) -> str:
    """What ``manage.py check`` reports for a bad value: the check id and its message
    (``<value>`` stands for the value given), or where the project-dependent check is."""
    if setting.rule is None:
        return "checked against the project (`llm_quota/checks.py`)"
    says = setting.rule.says.replace("{value!r}", "`<value>`")
    return f"`{setting.check_id}`: {says}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table(settings: Iterable[Any]) -> str:
    """The Markdown table of ``settings``, one row per declaration, in order."""
    rows = [HEADER]
    for setting in settings:
        meaning = setting.doc
        if setting.moved_to:
            meaning += " (warned as `llm_quota.W050` while set)"
        cells = [
            f"`{setting.name}`",
            f"`{shown_default(setting.default)}`",
            shown_rule(setting),
            meaning,
        ]
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def render_settings_page(markdown: str) -> str:
    """``markdown`` with its marker replaced by the table of every declared setting."""
    # Imported here: MkDocs restores ``sys.path`` after loading a hook module, and the
    # build may run from any working directory.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from llm_quota.conf import SETTINGS

    if markdown.count(MARKER) != 1:
        raise ValueError(f"{SETTINGS_PAGE} must hold the line {MARKER!r} exactly once")
    return markdown.replace(MARKER, settings_table(SETTINGS))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill in the settings page; every other page passes unchanged."""
    if page.file.src_uri != SETTINGS_PAGE:
        return markdown
    try:
        return render_settings_page(markdown)
    except ValueError as error:
        from mkdocs.exceptions import PluginError

        raise PluginError(str(error)) from error
