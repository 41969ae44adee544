-- usage: one user's live counters, for the usage API, the admin and the snapshot.
-- KEYS[1] user base B.
-- ARGV: 1 now (0 = Redis' clock), 2 ttl, 3 day ids, 4 day starts, 5 month ids,
--       6 month starts.
-- Returns {now, day, month, day_end, month_end, tokens_today, tokens_this_month,
--          reserved, requests_this_minute, tokens_this_minute, in_flight,
--          {per-model fields and values of the month}, seen (1/0)}
-- seen 0 means Redis lost this user's counters and they have not been restored yet.

local B = KEYS[1]
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local day, day_end = pick_period(ARGV[3], ARGV[4], now)
local month, month_end = pick_period(ARGV[5], ARGV[6], now)

-- Step 1: the same housekeeping as reserve, so the figures match the next decision.
housekeeping(B, now, ttl)

-- Step 2: read.
return {
  now, day, month, day_end, month_end,
  num(redis.call('GET', B .. ':d:' .. day)),
  num(redis.call('GET', B .. ':m:' .. month)),
  pending_total(B),
  redis.call('ZCARD', B .. ':w'),
  num(redis.call('HGET', B .. ':s', 'wsum')),
  redis.call('ZCARD', B .. ':p'),
  redis.call('HGETALL', B .. ':u:' .. month),
  redis.call('HEXISTS', B .. ':s', 'seen'),
}
