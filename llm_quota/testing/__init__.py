"""Opt-in test doubles: the fake provider."""
