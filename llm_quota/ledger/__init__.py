"""Redis storage: key builder, I/O-free plans, their replies, the sync and async
drivers, connections, resilience (outage), and the Lua scripts."""
