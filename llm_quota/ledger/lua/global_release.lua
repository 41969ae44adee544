-- global_release: a cluster's second release step: give the global share back whole.
-- KEYS[1] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl.
-- Returns 1 if released, 0 if it was no longer pending (idempotent).

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: release once; share_release() keeps the tombstone.
return share_release(G, ARGV[2], now, tonumber(ARGV[3]))
