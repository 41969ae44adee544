-- restore: bring back a user's day and months from the database after Redis lost
-- them, once.
-- KEYS[1] user base B, KEYS[2] index base I (the user's shard on a cluster).
-- ARGV: 1 user id, 2 now (0 = Redis' clock), 3 today, 4 its end, 5 its base tokens
--       (0: the snapshots hold no figure for today), then one group per month, the
--       month the next decision needs first:
--       month, month end, base tokens of the month, n, then n field/value items
--       ("req|<model>", count, "in|<model>", count, ...).
-- Returns 1 if restored, 0 if another request restored first.
-- The just-closed month comes back too: a settle arriving late after the loss would
-- otherwise leave a partial month that the snapshot copies over the full one.

local B, I = KEYS[1], KEYS[2]
local uid = ARGV[1]
local now = now_ms(ARGV[2])

-- Step 1: "seen" is set exactly once per loss, so concurrent restores cannot add the
-- database's figures twice.
if redis.call('HSETNX', B .. ':s', 'seen', '1') == 0 then return 0 end
redis.call('PEXPIREAT', B .. ':s', tonumber(ARGV[7]) + STRUCT_TTL)  -- the first month's end

-- Step 1b: today's counter, added (not overwritten) like the months below, so the
-- day's budget is not handed out again. It expires with the day, as reserve's does.
local day_end, day_total = tonumber(ARGV[4]), tonumber(ARGV[5])
if day_total > 0 and day_end > now then
  add_period(B .. ':d:' .. ARGV[3], day_total, day_end + DAY_GRACE)
end

local i = 6
while i <= #ARGV do
  local month, month_end, total = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local n = tonumber(ARGV[i + 3])
  local first, last = i + 4, i + 3 + n
  i = last + 1
  -- Step 2: a month whose counters would already have expired stays in the database.
  if month_end + MONTH_GRACE > now then
    -- Step 3: add, not overwrite: usage settled after the loss and before this
    -- restore is already in Redis and must stay.
    if total > 0 then
      add_period(B .. ':m:' .. month, total, month_end + MONTH_GRACE)
    end
    if n > 0 then
      local u = B .. ':u:' .. month
      for j = first, last, 2 do
        redis.call('HINCRBY', u, ARGV[j], tonumber(ARGV[j + 1]))
      end
      redis.call('PEXPIREAT', u, month_end + MONTH_GRACE)
      -- Step 4: back into the index, so the snapshot keeps this month in the
      -- database; NX keeps the time of a settle that came first.
      local a = I .. ':a:' .. month
      redis.call('ZADD', a, 'NX', 0, uid)
      redis.call('PEXPIREAT', a, month_end + MONTH_GRACE)
    end
  end
end
return 1
