-- restore: bring back a user's month from the database after Redis lost it, once.
-- KEYS[1] user base B, KEYS[2] index base I (the user's shard on a cluster).
-- ARGV: 1 user id, 2 month, 3 month end, 4 base tokens of the month,
--       5.. per-model field/value pairs ("req|<model>", n, ...).
-- Returns 1 if restored, 0 if another request restored first.

local B, I = KEYS[1], KEYS[2]
local uid, month, month_end, total = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

-- Step 1: "seen" is set exactly once per loss, so concurrent restores cannot add the
-- database's figures twice.
if redis.call('HSETNX', B .. ':s', 'seen', '1') == 0 then return 0 end
redis.call('PEXPIREAT', B .. ':s', month_end + STRUCT_TTL)

-- Step 2: add, not overwrite: usage settled after the loss and before this restore
-- is already in Redis and must stay.
if total > 0 then
  add_period(B .. ':m:' .. month, total, month_end + MONTH_GRACE)
end
if #ARGV > 4 then
  local u = B .. ':u:' .. month
  for i = 5, #ARGV, 2 do
    redis.call('HINCRBY', u, ARGV[i], tonumber(ARGV[i + 1]))
  end
  redis.call('PEXPIREAT', u, month_end + MONTH_GRACE)
  redis.call('ZADD', I .. ':a:' .. month, 0, uid)
  redis.call('PEXPIREAT', I .. ':a:' .. month, month_end + MONTH_GRACE)
end
return 1
