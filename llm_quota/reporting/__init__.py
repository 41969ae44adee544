"""Reporting: snapshots to SQL, usage queries, charts and the usage API."""
