-- key_restore: bring back an API key's day and months from the database after Redis
-- lost them. Runs only after restore.lua restored the key's user (once per loss), so the
-- database's figures are added once.
-- Time is in milliseconds in this script.
-- KEYS[1] the key's base K (in its user's slot).
-- ARGV: 1 now (0 = Redis' clock), 2 today, 3 its end, 4 its base tokens (0: the
--       snapshot holds no figure for today), then groups of six: month, month end,
--       base tokens, requests, input tokens, output tokens.
-- Returns the number of months restored.

local K = KEYS[1]
local now = now_ms(ARGV[1])
local restored = 0

-- Step 1: today's counter, added (not overwritten) as restore.lua adds the user's, so
-- the key's day budget is not handed out again. It expires with the day, as reserve's
-- does; a day already over (the caller's guess of today was late) stays out.
local day_end, day_total = tonumber(ARGV[3]), tonumber(ARGV[4])
if day_total > 0 and day_end > now then
  add_period(K .. ':d:' .. ARGV[2], day_total, day_end + DAY_GRACE)
end

for i = 5, #ARGV, 6 do
  local month, month_end = ARGV[i], tonumber(ARGV[i + 1])
  -- Step 2: a month whose counters would already have expired stays in the database.
  if month_end + MONTH_GRACE > now then
    -- Step 3: add, not overwrite: usage settled after the loss is in Redis already.
    local base = tonumber(ARGV[i + 2])
    if base > 0 then add_period(K .. ':m:' .. month, base, month_end + MONTH_GRACE) end
    local n = K .. ':n:' .. month
    redis.call('HINCRBY', n, 'base', base)
    redis.call('HINCRBY', n, 'req', tonumber(ARGV[i + 3]))
    redis.call('HINCRBY', n, 'in', tonumber(ARGV[i + 4]))
    redis.call('HINCRBY', n, 'out', tonumber(ARGV[i + 5]))
    redis.call('PEXPIREAT', n, month_end + MONTH_GRACE)
    restored = restored + 1
  end
end
return restored
