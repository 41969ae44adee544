-- global_settle: a cluster's second settle step: the global share of a reservation.
-- KEYS[1] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 actual base tokens,
--       5 day, 6 month, 7 month end, 8 charge a missing record (1/0): 1 when the
--       user's step charged just now, 0 when it had been settled before (then this
--       only completes a share a failed settle left pending).
-- Returns the amount the global counters moved by.

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: housekeeping first, so an expired share is settled as late (charged whole).
share_housekeeping(G, now, tonumber(ARGV[3]))

-- Step 2: settle once; share_settle() keeps the tombstone.
return share_settle(G, ARGV[2], tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7]),
  ARGV[8] == '1', now, tonumber(ARGV[3]))
