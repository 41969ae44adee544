"""A minimal site served by real gunicorn, uvicorn and Celery workers in the
many-processes tests: each process runs the app as production would."""
