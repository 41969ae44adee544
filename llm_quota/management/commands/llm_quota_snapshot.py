"""``manage.py llm_quota_snapshot``: the beat task's snapshot, run by hand."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm_quota.management.progress import progress
from llm_quota.reporting.snapshot import BATCH_USERS, SnapshotBusy, count_active, snapshot_usage


class Command(BaseCommand):
    help = (
        "Copy the Redis usage (current and just-closed month) of every user active since "
        "the last run into UsageSnapshot; --full walks every user. Safe to run at any "
        "time, also beside the Celery beat schedule."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--batch-size", type=int, default=BATCH_USERS, help="users per batch (one commit each)"
        )
        parser.add_argument(
            "--wait", type=float, default=60.0, help="seconds to wait for a running snapshot"
        )
        parser.add_argument(
            "--full", action="store_true", help="read every user in the index, not only "
            "those active since the last run",
        )  # fmt: skip
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        bar = None
        if not options["no_progress"]:
            # The raw stream: OutputWrapper would end each redraw with a newline. tqdm
            # where installed, else a line every tenth (management/progress.py).
            stream = getattr(self.stderr, "_out", self.stderr)
            total = count_active(full=options["full"])
            bar = progress(total, desc="snapshot", unit="user", file=stream)
        try:
            run = snapshot_usage(
                batch_size=options["batch_size"],
                progress=bar.update if bar is not None else None,
                lock_wait=options["wait"],
                full=options["full"],
            )
        except SnapshotBusy as exc:
            raise CommandError(f"{exc}; try again, or raise --wait") from exc
        finally:
            if bar is not None:
                bar.close()
        walk = "every user" if run.full else "users active since the last run"
        self.stdout.write(
            self.style.SUCCESS(
                f"Snapshot of {', '.join(run.months)} ({walk}): {run.users} users read, "
                f"{run.rows_written} rows written, {run.lost} awaiting restore, "
                f"{run.unknown} unknown ids."
            )
        )
        raised = {
            "users": run.raised_users, "API keys": run.raised_keys, "teams": run.raised_teams,
            "global counters": run.raised_global,
        }  # fmt: skip
        if any(raised.values()):
            self.stdout.write(
                self.style.WARNING(
                    "Behind the database (writes Redis lost) and raised: "
                    + ", ".join(f"{n} {what}" for what, n in raised.items() if n)
                    + "."
                )
            )
