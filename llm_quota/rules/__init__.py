"""What is charged and what is allowed: accounting, periods, estimation, pricing,
policy. No Redis, no HTTP."""
