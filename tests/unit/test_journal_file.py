"""The outage journal on disk (``JOURNAL_DIR``): what a process journaled outlives it,
a living process' file is never adopted, a dead one's is adopted exactly once."""

from __future__ import annotations

import multiprocessing
import os

from llm_quota.ledger.fallback import OutageJournal
from llm_quota.ledger.journal_file import JournalFile, pending
from llm_quota.ledger.plans import drive
from llm_quota.ledger.replies import Reservation
from llm_quota.rules.accounting import ActualUsage, Estimate, Price

PRICE = Price("gpt-4o", 1_000_000, 4_000_000, pattern="gpt-4*")


def reservation(n: int, *, unmetered: bool = True) -> Reservation:
    return Reservation(
        id=f"r{n}",
        user_id="7",
        model="gpt-4o",
        reserved=0,
        max_tokens=20,
        estimate=Estimate(PRICE, 10, 20, prompt_floor=3),
        day="2026-12-03",
        month="2026-12",
        month_end_ms=1_798_761_600_000,
        uses_global=True,
        unmetered=unmetered,
    )


def journal_in(directory, interval: float = 0.05) -> OutageJournal:
    return OutageJournal(store=JournalFile(directory, interval))


def charge_all(journal: OutageJournal) -> list:
    seen = []

    def apply(res, usage):
        seen.append((res.id, usage))
        return
        yield

    drive(journal.replay(apply), lambda step: None)
    return seen


def test_an_entry_reads_back_whole_from_its_line(tmp_path):
    journal = journal_in(tmp_path)
    journal.record(reservation(1), ActualUsage(10, 5, 2))
    journal.record(reservation(2, unmetered=False), None)  # a release
    entries = list(pending(journal.store.path.read_bytes()))
    assert entries == [
        (reservation(1), ActualUsage(10, 5, 2)),
        (reservation(2, unmetered=False), None),
    ]


def _journal_and_die(directory: str, count: int) -> None:
    journal = journal_in(directory, interval=60)  # no fsync in time: the page cache only
    for n in range(count):
        journal.record(reservation(n), ActualUsage(n, 1))
    os._exit(0)  # no close, no flush: as abrupt as SIGKILL for what was written


def test_a_dead_process_file_is_adopted_once_and_unlinked(tmp_path):
    process = multiprocessing.get_context("spawn").Process(
        target=_journal_and_die, args=(str(tmp_path), 3)
    )
    process.start()
    process.join(30)
    assert process.exitcode == 0
    (orphan,) = tmp_path.iterdir()

    first, second = journal_in(tmp_path), journal_in(tmp_path)
    assert first.adopt() == 3 and second.adopt() == 0
    assert not orphan.exists()
    assert len(first) == 3 and len(second) == 0
    # The adopted entries are in the adopter's own file before the orphan goes.
    assert len(list(pending(first.store.path.read_bytes()))) == 3
    assert [rid for rid, _ in charge_all(first)] == ["r0", "r1", "r2"]


def test_a_living_process_file_is_left_alone(tmp_path):
    owner, other = journal_in(tmp_path), journal_in(tmp_path)
    owner.record(reservation(1), ActualUsage(1, 1))
    assert other.adopt() == 0 and len(owner) == 1


def test_charged_entries_are_not_adopted_and_an_empty_journal_leaves_an_empty_file(tmp_path):
    journal = journal_in(tmp_path)
    for n in range(3):
        journal.record(reservation(n), ActualUsage(1, 1))

    def first_two(res, usage):
        if res.id == "r2":
            raise ConnectionError("Redis went again")
        return
        yield

    try:
        drive(journal.replay(first_two), lambda step: None)
    except ConnectionError:
        pass
    assert [r.id for r, _ in pending(journal.store.path.read_bytes())] == ["r2"]
    charge_all(journal)
    assert journal.store.path.stat().st_size == 0
    journal.close()
    assert list(tmp_path.iterdir()) == [], "an empty file is removed on close"


def test_a_closed_journal_with_entries_is_adopted_by_the_next_one(tmp_path):
    journal = journal_in(tmp_path)
    journal.record(reservation(1), ActualUsage(1, 1))
    journal.close()  # settings changed: a new outage state takes over
    successor = journal_in(tmp_path)
    assert successor.adopt() == 1


def test_a_torn_last_line_is_skipped(tmp_path):
    journal = journal_in(tmp_path)
    journal.record(reservation(1), ActualUsage(1, 1))
    data = journal.store.path.read_bytes()
    assert len(list(pending(data + data[:40]))) == 1
