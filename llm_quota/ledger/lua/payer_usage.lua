-- payer_usage: one payer's live counters (an API key's, a team's), for their usage
-- endpoints and the admin.
-- KEYS[1] the payer's base P (a key's K, in its user's slot; a team's T).
-- ARGV: 1 now (0 = Redis' clock), 2 ttl, 3 day ids, 4 day starts, 5 month ids,
--       6 month starts.
-- Returns {now, day, month, day_end, month_end, tokens_today, tokens_this_month,
--          reserved, requests_this_minute, {P:n:<month> fields and values}, in_flight,
--          seen (1/0: a team's counters are trusted; always 0 for a key, restored with
--          its user)}

local P = KEYS[1]
local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local day, day_end = pick_period(ARGV[3], ARGV[4], now)
local month, month_end = pick_period(ARGV[5], ARGV[6], now)

-- Step 1: the same housekeeping as reserve, so the figures match the next decision.
share_housekeeping(P, now, ttl)
local requests = payer_window(P, now)

-- Step 2: what is still reserved: the pending shares' estimates.
local reserved = 0
local rids = redis.call('ZRANGE', P .. ':p', 0, -1)
for start = 1, #rids, BATCH do
  local recs = redis.call('HMGET', P .. ':rr', unpack(rids, start, math.min(start + BATCH - 1, #rids)))
  for i = 1, #recs do
    if recs[i] then
      local state, est = parse_record(recs[i])
      if state == 'p' then reserved = reserved + est end
    end
  end
end

-- Step 3: read.
local used_day, used_month = share_used(P, day, month)
return {
  now, day, month, day_end, month_end, used_day, used_month, reserved, requests,
  redis.call('HGETALL', P .. ':n:' .. month),
  redis.call('ZCARD', P .. ':p'),
  redis.call('HEXISTS', P .. ':s', 'seen'),
}
