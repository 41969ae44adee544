"""What the test groups share: the redis-server launcher, the Redis fixtures, factories,
the pinned clock and its periods, the ``spend`` helper, the gateway client and the fake
upstream."""
