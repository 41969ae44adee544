"""``manage.py llm_quota_snapshot``: the beat task's snapshot, run by hand."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from llm_quota.snapshot import SnapshotBusy, count_active, snapshot_usage


class Command(BaseCommand):
    help = (
        "Copy every active user's Redis usage (current and just-closed month) into "
        "UsageSnapshot. Safe to run at any time, also beside the Celery beat schedule."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--batch-size", type=int, default=500, help="users per pipeline")
        parser.add_argument(
            "--wait", type=float, default=60.0, help="seconds to wait for a running snapshot"
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be at least 1")
        bar = None
        try:
            from tqdm import tqdm
        except ImportError:  # an optional extra: django-llm-quota[reports]
            tqdm = None
        if tqdm is not None and not options["no_progress"]:
            # The raw stream: OutputWrapper would end each redraw with a newline.
            stream = getattr(self.stderr, "_out", self.stderr)
            bar = tqdm(total=count_active(), unit="user", desc="snapshot", file=stream)
        try:
            run = snapshot_usage(
                batch_size=options["batch_size"],
                progress=bar.update if bar is not None else None,
                lock_wait=options["wait"],
            )
        except SnapshotBusy as exc:
            raise CommandError(f"{exc}; try again, or raise --wait") from exc
        finally:
            if bar is not None:
                bar.close()
        self.stdout.write(
            self.style.SUCCESS(
                f"Snapshot of {', '.join(run.months)}: {run.users} users read, "
                f"{run.rows_written} rows written, {run.lost} awaiting restore, "
                f"{run.unknown} unknown ids."
            )
        )
