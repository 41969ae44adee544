"""``make loadtest``: the gateway under load, through gunicorn, against a slow upstream.

Bounded (about 5,000 requests, 64 at once) and on loopback only. It checks what the
contract promises under load: no 5xx, Redis usage equal to the sum of the usage the
responses reported, and nothing left reserved.
"""
