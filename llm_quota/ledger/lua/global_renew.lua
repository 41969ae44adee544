-- global_renew: a cluster's second renew step: the global share's lease, in G's slot.
-- KEYS[1] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl.
-- Returns 1 if renewed, 0 if the share was no longer pending.

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: move the share's lease out to a TTL from now, if it is still pending.
if renew_lease(G, ARGV[2], now + tonumber(ARGV[3])) then return 1 end
return 0
