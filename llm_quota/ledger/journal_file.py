"""The outage journal on disk: one append-only file per process (``JOURNAL_DIR``).

Why a file per process: appends need no coordination, and a process' death is easy to
see. Each process holds an exclusive ``flock`` on its own file while it lives; the
kernel drops the lock when the process dies, however it dies (SIGKILL, OOM). A file
whose lock can be taken belongs to a dead process: the taker adopts its entries
(copies them into its own journal, made durable first) and then unlinks it. The lock
held while adopting is the claim, so two processes never adopt the same file; were an
entry replayed twice all the same, settle and release are idempotent per reservation
id (for ``RESERVATION_TTL``).

Durability: each entry is one ``os.write`` of one line before the settle or release
returns, so it is in the kernel's page cache, which outlives the process: a killed
process loses nothing it journaled. ``fsync`` (which outlives the machine) runs in a
background thread at most every ``JOURNAL_FSYNC_INTERVAL`` seconds while entries are
unsynced: a crash of the whole host may lose that last interval.

Lines are JSON: ``{"n": seq, "r": reservation, "u": usage or null}`` an entry,
``{"done": seq}`` an entry charged. A file whose entries are all charged is
truncated, so an idle process' file stays empty.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_quota.ledger.replies import Reservation
from llm_quota.rules.accounting import ActualUsage, Estimate, Price

logger = logging.getLogger("llm_quota")

SUFFIX = ".journal"

Entry = tuple[Reservation, ActualUsage | None]


# -- the codec -------------------------------------------------------------------------


def encode(seq: int, reservation: Reservation, usage: ActualUsage | None) -> bytes:
    """One entry as one line (the reservation whole: a late settle needs its copy)."""
    line = {
        "n": seq,
        "r": dataclasses.asdict(reservation),
        "u": None if usage is None else dataclasses.asdict(usage),
    }
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def decode(line: dict[str, Any]) -> Entry:
    fields = dict(line["r"])
    estimate = fields.pop("estimate")
    if estimate is not None:
        estimate = Estimate(**{**estimate, "price": Price(**estimate["price"])})
    usage = line["u"]
    return (
        Reservation(**fields, estimate=estimate),
        None if usage is None else ActualUsage(**usage),
    )


def pending(data: bytes) -> Iterator[Entry]:
    """The entries of a file's contents not marked charged, in order. A torn last line
    (a write cut by a crash of the host) is skipped: it never returned to its caller."""
    entries: dict[int, dict[str, Any]] = {}
    for raw in data.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if "done" in line:
            entries.pop(line["done"], None)
        else:
            entries[line["n"]] = line
    for line in entries.values():
        try:
            yield decode(line)
        except (KeyError, TypeError) as exc:
            logger.error("journal: skipping an entry that cannot be read (%s): %.200r", exc, line)


# -- one process' file -------------------------------------------------------------------


class JournalFile:
    """This process' file in ``directory``, made on the first entry, locked while open."""

    def __init__(self, directory: str | os.PathLike[str], fsync_interval: float = 0.05) -> None:
        self.directory = Path(directory)
        self.fsync_interval = float(fsync_interval)
        self._fd: int | None = None
        self._pid = 0
        self._path: Path | None = None
        self._seq = 0
        self._lock = threading.Lock()
        self._unsynced = threading.Event()
        self._closed = threading.Event()
        self._syncer: threading.Thread | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    # -- writing -----------------------------------------------------------------------

    def append(self, reservation: Reservation, usage: ActualUsage | None) -> int:
        """Write one entry; returns its sequence number (for ``charged``)."""
        with self._lock:
            fd = self._open()
            self._seq += 1
            os.write(fd, encode(self._seq, reservation, usage))
            self._written()
            return self._seq

    def charged(self, seqs: list[int], *, empty: bool) -> None:
        """Mark entries charged; ``empty``: the journal holds nothing more, so the file
        is truncated instead (nothing in it is owed any more)."""
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                return
            if empty:
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
            elif seqs:
                os.write(self._fd, b"".join(b'{"done":%d}\n' % n for n in seqs))
            self._written()

    def sync(self) -> None:
        """fsync now (before an adopted file is unlinked: its entries must be safe here).
        Outside the lock: appends go on while the disk works (what they write after the
        flag is cleared sets it again, for the next round)."""
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                return
            fd = self._fd
            self._unsynced.clear()
        os.fsync(fd)

    def _written(self) -> None:
        if self.fsync_interval <= 0:
            os.fsync(self._fd)  # type: ignore[arg-type]
        else:
            self._unsynced.set()

    def _open(self) -> int:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        # First entry, or a forked child holding its parent's descriptor (and lock): a
        # file of its own. The parent's descriptor is left alone, never closed here.
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd, self._pid, self._path, self._seq = fd, os.getpid(), path, 0
        self._closed.clear()
        if self.fsync_interval > 0:
            self._syncer = threading.Thread(
                target=self._sync_loop, name="llm-quota-journal-fsync", daemon=True
            )
            self._syncer.start()
        return fd

    def _sync_loop(self) -> None:
        """Batched fsync: one per interval at most, none while nothing was written."""
        while not self._closed.is_set():
            if not self._unsynced.wait(timeout=1.0):
                continue
            self._closed.wait(self.fsync_interval)
            try:
                self.sync()
            except OSError:
                if not self._closed.is_set():  # else close() synced it, and closed it
                    logger.exception("journal: fsync of %s failed", self._path)

    def close(self) -> None:
        """Sync and close (settings changed, tests). The file stays if it holds entries."""
        with self._lock:
            fd, self._fd = self._fd, None
            self._closed.set()
            if fd is None or self._pid != os.getpid():
                return
            os.fsync(fd)
            empty = os.fstat(fd).st_size == 0
            if empty and self._path is not None:
                self._path.unlink(missing_ok=True)
            os.close(fd)  # drops the lock: a non-empty file is adopted by the next process

    # -- adopting the dead's files -----------------------------------------------------------

    def orphans(self) -> Iterator[tuple[Path, list[Entry]]]:
        """Files of dead processes, each locked (claimed) while the caller takes its
        entries; it is unlinked when the caller resumes the iteration."""
        try:
            names = sorted(p for p in self.directory.iterdir() if p.name.endswith(SUFFIX))
        except FileNotFoundError:
            return
        for path in names:
            if path == self._path:
                continue
            claimed = _claim(path)
            if claimed is None:
                continue
            try:
                data = _read(claimed)
                yield path, list(pending(data))
                path.unlink(missing_ok=True)
            finally:
                os.close(claimed)


def _claim(path: Path) -> int | None:
    """The file's descriptor, locked, if its owner is dead and nobody adopted it yet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Another process may have adopted and unlinked it between our open and our
        # lock: then the path is gone, or names a newer file.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError:  # BlockingIOError: alive; FileNotFoundError: adopted meanwhile
        os.close(fd)
        return None
    return fd


def _read(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)
