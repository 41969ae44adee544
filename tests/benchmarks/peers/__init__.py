"""``make bench-peers``: the gateway beside the LiteLLM proxy, in one run.

Four targets sit in front of the same stdlib fake upstream (section 10's): the upstream
called directly, ours on gunicorn 2x8 threads (the DRF view), ours on uvicorn 2 workers
with uvloop and httptools (the async view), and the LiteLLM proxy (2 workers, no
database, per-key rpm/tpm limits from ``litellm_auth.py``, logging off) installed in its
own virtualenv (``var/peers-venv``). ``bench.py`` measures, ``plot.py`` draws the SVG.
"""
