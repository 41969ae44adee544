"""Plans: the sans-I/O protocol every operation above Redis is written in.

A plan is a generator. It yields a *step* (run this script, load this month from the
database, hand me the ledger...) and is sent the step's result, or thrown its error, so
it may undo earlier steps before the error goes on. What to do is decided once, in
the plan; ``drive`` and ``adrive`` only wait, synchronously or on an event loop. So a
sync and an async caller can never drift apart: they run the same plan.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class ScriptCall:
    """Run the ledger's Lua script ``script``; the reply is sent back."""

    script: str
    keys: tuple[str, ...]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class LoadMonth:
    """Ask the restore source (the database) for a user's month (``user_id`` ``""``:
    everyone's, for the global caps); sent back as ``(base_tokens, [ModelUsage, ...])``
    or a ``restore.Restored`` (which adds the month's last snapshotted day), or
    ``(0, [])`` without a source."""

    user_id: str
    month: str
    #: Ask for the month of each of the user's API keys instead, sent back as
    #: ``[(key id, KeyMonth), ...]`` (``[]`` without a source).
    api_keys: bool = False


@dataclass(frozen=True)
class LoadTeamMonth:
    """Ask the team restore source (the database) for a team's month; sent back as a
    ``TeamMonth``, or None (no snapshot, or no source)."""

    team: str
    month: str


@dataclass(frozen=True)
class UseLedger:
    """Hand the plan the ledger it runs on, built on first use: a plan that may not
    touch Redis at all (the breaker is open) asks only when it will. ``build=False``
    asks for it only if it exists already (its clock, say), else None."""

    build: bool = True


Plan = Generator[Any, Any, T]

#: The two ``UseLedger`` steps, built once: plans yield them on every request.
USE_LEDGER = UseLedger()
CURRENT_LEDGER = UseLedger(build=False)


class _Run:
    """One plan under way: its current step, or its result once it has returned."""

    def __init__(self, plan: Plan[Any]) -> None:
        self.plan = plan
        self.done = False
        self.step: Any = None
        self.value: Any = None
        self.resume(None, None)

    def resume(self, reply: Any, error: BaseException | None) -> None:
        """Hand the plan the last step's reply, or throw it the step's error."""
        try:
            self.step = self.plan.send(reply) if error is None else self.plan.throw(error)
        except StopIteration as returned:
            self.done, self.value = True, returned.value

    def perform_with(self, perform: Callable[[Any], Any]) -> None:
        try:
            reply = perform(self.step)
        except BaseException as exc:  # an interrupt too: the plan may undo its steps
            self.resume(None, exc)
        else:
            self.resume(reply, None)


def drive(plan: Plan[T], perform: Callable[[Any], Any]) -> T:
    """Run ``plan`` to its end, performing each step with ``perform``."""
    run = _Run(plan)
    while not run.done:
        run.perform_with(perform)
    return run.value


async def adrive(plan: Plan[T], perform: Callable[[Any], Awaitable[Any]]) -> T:
    """``drive`` on an event loop. A cancellation is thrown into the plan too, so a
    half-done step (a cluster's first reserve) can be withdrawn before the task ends."""
    run = _Run(plan)
    while not run.done:
        try:
            reply = await perform(run.step)
        except BaseException as exc:
            run.resume(None, exc)
        else:
            run.resume(reply, None)
    return run.value
