"""A progress bar for the app's long commands: tqdm where installed, else plain lines.

tqdm is pinned in the demo's requirements but is not one of the app's dependencies,
so a project without it still gets a readable, if plainer, display.
"""

from __future__ import annotations

from io import TextIOBase
from typing import Any, TextIO

#: A stream, or a command's ``self.stdout``/``self.stderr`` (Django's OutputWrapper).
Output = TextIO | TextIOBase


class _Lines:
    """tqdm's ``update``/``set_postfix_str``/``close`` subset, printing every tenth."""

    def __init__(self, total: float, desc: str, unit: str, file: Output) -> None:
        self.total, self.desc, self.unit, self.file = total, desc, unit, file
        self.n: float = 0
        self._shown = -1
        self._postfix = ""

    def update(self, amount: float = 1) -> None:
        self.n += amount
        tenth = int(10 * self.n / self.total) if self.total else 10
        if tenth != self._shown:
            self._shown = tenth
            self.file.write(f"{self.desc}: {self.n:,.0f}/{self.total:,.0f} {self.unit} "
                            f"{self._postfix}\n")  # fmt: skip

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text

    def close(self) -> None:
        self.file.flush()


def progress(total: float, *, desc: str, unit: str, file: Output) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        return _Lines(total, desc, unit, file)
    return tqdm(total=total, desc=desc, unit=unit, file=file, dynamic_ncols=True,
                unit_scale=total > 10_000)  # fmt: skip
