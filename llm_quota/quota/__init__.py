"""Admission and settlement: the rules run against the ledger (``admit``,
``settle``, ``release``), ``QuotaGuard`` and the alerts."""
