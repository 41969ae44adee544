"""The README's quickstart snippets, found by their markers.

Each snippet is a fenced block right after an HTML comment ``<!-- install:NAME -->``,
invisible on GitHub. The install test applies them as they are, so the README cannot
drift from what works; a missing or moved marker fails with its name.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"

#: The marker, then the fenced block that must follow it (blank lines allowed between).
BLOCK = re.compile(r"<!-- install:([\w-]+) -->\s*\n```(\w*)\n(.*?)\n```", re.S)
MARKER = re.compile(r"<!-- install:([\w-]+) -->")

#: What the install test applies, and the fence language each block must have.
SNIPPETS = {
    "pip": "sh",
    "settings": "python",
    "urls": "python",
    "views": "python",
    "celery": "python",
    "celery-init": "python",
    "setup": "sh",
    "client": "python",
}


def snippets(text: str | None = None) -> dict[str, tuple[str, str]]:
    """Every marked block of the README: name -> (fence language, code)."""
    text = README.read_text() if text is None else text
    found = {name: (lang, code) for name, lang, code in BLOCK.findall(text)}
    stray = set(MARKER.findall(text)) - set(found)
    if stray:
        raise AssertionError(f"README.md: no fenced block follows install marker(s) {stray}")
    return found


def snippet(name: str, text: str | None = None) -> str:
    """The code of the block marked ``<!-- install:name -->``, or a clear failure."""
    found = snippets(text)
    if name not in found:
        raise AssertionError(
            f"README.md has no `<!-- install:{name} -->` marker before a fenced block: "
            "the install test applies that snippet (tests/support/readme.py)."
        )
    lang, code = found[name]
    if SNIPPETS.get(name, lang) != lang:
        raise AssertionError(f"README.md: the install:{name} block must be ```{SNIPPETS[name]}")
    return code


def commands(name: str, text: str | None = None) -> list[list[str]]:
    """The commands of a shell snippet, each split as the shell splits it (comments
    dropped); a quoted argument may span lines."""
    found: list[list[str]] = []
    pending = ""
    for line in snippet(name, text).splitlines():
        pending += line + "\n"
        try:
            argv = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        if argv:
            found.append(argv)
        pending = ""
    if pending.strip():
        raise AssertionError(f"README.md: install:{name} ends inside a quoted argument")
    return found
