-- global_usage: what everyone has used and holds today and this month.
-- KEYS[1] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 ttl, 3 day ids, 4 day starts, 5 month ids,
--       6 month starts.
-- Returns {now, day, month, day_end, month_end, tokens_today, tokens_this_month,
--          shares_in_flight}

local G = KEYS[1]
local now = now_ms(ARGV[1])
local day, day_end = pick_period(ARGV[3], ARGV[4], now)
local month, month_end = pick_period(ARGV[5], ARGV[6], now)

-- Step 1: the same housekeeping as global_reserve, so expired shares are not counted.
share_housekeeping(G, now, tonumber(ARGV[2]))

-- Step 2: read.
local g_day, g_month = share_used(G, day, month)
return {now, day, month, day_end, month_end, g_day, g_month, redis.call('ZCARD', G .. ':p')}
