"""The chaos soak (``make soak``): load through gunicorn while faults are injected,
then every invariant checked. Not part of ``make test``."""
