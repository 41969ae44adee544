-- global_restore: bring back the global caps' day and month counters from the
-- database (all users' snapshots summed) after Redis lost them, once per loss.
-- Time is in milliseconds in this script.
-- KEYS[1] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 today, 3 its end, 4 its base tokens,
--       5 month, 6 its end, 7 its base tokens.
-- Returns 1 if restored, 0 if another request restored (or found them) first.

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: "seen" is set exactly once per loss, so concurrent restores cannot add the
-- database's figures twice. It has no expiry: one small hash for the deployment, and
-- a marker that expired under live counters would add the database's on top of them.
if redis.call('HSETNX', G .. ':s', 'seen', '1') == 0 then return 0 end

-- Step 2: add, not overwrite: shares taken after the loss and before this restore
-- are in the counters already and must stay.
local day_end, day_total = tonumber(ARGV[3]), tonumber(ARGV[4])
if day_total > 0 and day_end > now then
  add_period(G .. ':d:' .. ARGV[2], day_total, day_end + DAY_GRACE)
end
local month_end, month_total = tonumber(ARGV[6]), tonumber(ARGV[7])
if month_total > 0 and month_end + MONTH_GRACE > now then
  add_period(G .. ':m:' .. ARGV[5], month_total, month_end + MONTH_GRACE)
end
return 1
