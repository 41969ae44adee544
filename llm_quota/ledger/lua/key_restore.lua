-- key_restore: bring back an API key's months from the database after Redis lost them.
-- Runs only after restore.lua restored the key's user (once per loss), so the
-- database's figures are added once.
-- KEYS[1] the key's base K (in its user's slot).
-- ARGV: 1 now (0 = Redis' clock), then groups of six: month, month end, base tokens,
--       requests, input tokens, output tokens.
-- Returns the number of months restored.

local K = KEYS[1]
local now = now_ms(ARGV[1])
local restored = 0

for i = 2, #ARGV, 6 do
  local month, month_end = ARGV[i], tonumber(ARGV[i + 1])
  -- Step 1: a month whose counters would already have expired stays in the database.
  if month_end + MONTH_GRACE > now then
    -- Step 2: add, not overwrite: usage settled after the loss is in Redis already.
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
