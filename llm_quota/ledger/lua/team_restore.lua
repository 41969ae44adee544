-- team_restore: bring back a team's months from the database after Redis lost them, once.
-- KEYS[1] the team's base T (its own slot on a cluster).
-- ARGV: 1 now (0 = Redis' clock), then one group per month, the month the next
--       decision needs first: month, month end, base tokens of the month, n, then n
--       field/value items of T:n:<month> ("req", count, "base|u:<uid>", count, ...).
-- Returns 1 if restored, 0 if another request restored first.
-- The just-closed month comes back too, as for users (restore.lua).

local T = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: "seen" is set exactly once per loss, so concurrent restores cannot add the
-- database's figures twice; it lives as payer_trusted() keeps it.
if redis.call('HSETNX', T .. ':s', 'seen', '1') == 0 then return 0 end
redis.call('HSET', T .. ':s', 't', math.floor(now / 86400000))
redis.call('PEXPIREAT', T .. ':s', now + STRUCT_TTL)

local i = 2
while i <= #ARGV do
  local month, month_end, total = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local n = tonumber(ARGV[i + 3])
  local first, last = i + 4, i + 3 + n
  i = last + 1
  -- Step 2: a month whose counters would already have expired stays in the database.
  if month_end + MONTH_GRACE > now then
    -- Step 3: add, not overwrite: usage settled after the loss and before this
    -- restore is already in Redis and must stay.
    if total > 0 then add_period(T .. ':m:' .. month, total, month_end + MONTH_GRACE) end
    if n > 0 then
      local usage = T .. ':n:' .. month
      for j = first, last, 2 do
        redis.call('HINCRBY', usage, ARGV[j], tonumber(ARGV[j + 1]))
      end
      redis.call('PEXPIREAT', usage, month_end + MONTH_GRACE)
    end
  end
end
return 1
