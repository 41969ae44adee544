-- payer_settle: a cluster's second settle step for a payer in its own slot (a team).
-- KEYS[1] the payer's base P.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 actual base tokens,
--       5 day, 6 month, 7 month end, 8 charge a missing record (1/0, as in
--       global_settle.lua), 9 usage field suffixes (csv, see payer_usage),
--       10 input tokens, 11 output tokens.
-- Returns {the amount the payer's counters moved by, its month settled after this (-1
-- when this settle changed nothing)}.

local P = KEYS[1]
local now, ttl = now_ms(ARGV[1]), tonumber(ARGV[3])
local actual = tonumber(ARGV[4])

-- Step 1: housekeeping first, so an expired share is settled as late (charged whole).
share_housekeeping(P, now, ttl)

-- Step 2: settle once (share_settle() keeps the tombstone); only a settle that moved
-- the counters, or charged a share it had lost, records the month's usage.
local rec = redis.call('HGET', P .. ':rr', ARGV[2])
local fresh = (rec == false and ARGV[8] == '1') or (rec and string.sub(rec, 1, 1) ~= 's'
  and string.sub(rec, 1, 1) ~= 'l')
local delta = share_settle(P, ARGV[2], actual, ARGV[5], ARGV[6], tonumber(ARGV[7]),
  ARGV[8] == '1', now, ttl)
local total = -1
if fresh then
  total = payer_usage(P, ARGV[6], tonumber(ARGV[7]), ARGV[9], tonumber(ARGV[10]),
    tonumber(ARGV[11]), actual)
  -- Step 3 (burn.lua): the payer's minute counts it, and teaches its baseline.
  burn_settled(P, now, payer_minute(P, now, actual))
end
return {delta, total}
