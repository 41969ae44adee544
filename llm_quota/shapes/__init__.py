"""API shapes: per API (chat completions, responses, embeddings, Anthropic messages),
what a request is billed for, which field caps its output, and where its usage is read.
Pure: no I/O, so every adapter (throttle, decorator, gateway) shares them."""
