"""The OpenAI-compatible gateway: views, request adapters, upstream, relay, schema."""
