-- reset: forgive a user's usage of the current day and month (an admin action).
-- KEYS[1] user base B, KEYS[2] index base I (the user's shard on a cluster).
-- ARGV: 1 now (0 = Redis' clock), 2 ttl, 3 user id, 4 day ids, 5 day starts,
--       6 month ids, 7 month starts.
-- Returns {day, month, month counter before, month counter after, generation}.
-- Global counters keep the usage: the money was spent, only this user is forgiven.
-- The reset starts a new generation (B:s "gen"): the snapshot keeps the generation
-- it copied, so a counter found below its snapshot tells a reset (a new generation:
-- Redis' figure stands) from writes a promoted replica missed (the same: raise.lua).

local B, I = KEYS[1], KEYS[2]
local now = now_ms(ARGV[1])
local ttl, uid = tonumber(ARGV[2]), ARGV[3]
local day, day_end = pick_period(ARGV[4], ARGV[5], now)
local month, month_end = pick_period(ARGV[6], ARGV[7], now)

-- Step 1: abandoned reservations give their estimates back first.
housekeeping(B, now, ttl)

-- Step 2: what requests still in flight hold in these periods stays: they settle or
-- release against these counters later, which must never go below zero.
local held_day, held_month = 0, 0
local pending = redis.call('ZRANGE', B .. ':p', 0, -1)
for start = 1, #pending, BATCH do
  local chunk = {}
  for k = start, math.min(start + BATCH - 1, #pending) do chunk[#chunk + 1] = pending[k] end
  local recs = redis.call('HMGET', B .. ':rr', unpack(chunk))
  for k = 1, #chunk do
    if recs[k] then
      local state, est, rday, rmonth = parse_record(recs[k])
      if state == 'p' then
        if rday == day then held_day = held_day + est end
        if rmonth == month then held_month = held_month + est end
      end
    end
  end
end

-- Step 3: the period counters keep only what is in flight, and their expiry.
local function set_counter(key, value, expire_at)
  if redis.call('EXISTS', key) == 1 then
    redis.call('SET', key, value, 'KEEPTTL')
  elseif value > 0 then
    redis.call('SET', key, value, 'PXAT', expire_at)
  end
end
local before = num(redis.call('GET', B .. ':m:' .. month))
set_counter(B .. ':d:' .. day, held_day, day_end + DAY_GRACE)
set_counter(B .. ':m:' .. month, held_month, month_end + MONTH_GRACE)

-- Step 4: the month's settled per-model usage goes; the snapshot sees the user as
-- changed now and zeroes the month's rows in the database.
redis.call('DEL', B .. ':u:' .. month)
local a = I .. ':a:' .. month
redis.call('ZADD', a, now, uid)
redis.call('PEXPIREAT', a, month_end + MONTH_GRACE)

-- Step 5: the counters are authoritative, not lost: restore must not add the
-- database's old figures back. The new generation is the reset's time (at least the
-- old one plus one): unique even where a reset itself was lost with a failover and
-- another one followed, so two resets never share a number.
local gen = math.max(num(redis.call('HGET', B .. ':s', 'gen')) + 1, now)
redis.call('HSET', B .. ':s', 'seen', '1', 'gen', gen)
touch(B, now)
return {day, month, before, held_month, gen}
