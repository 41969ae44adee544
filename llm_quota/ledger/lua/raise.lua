-- raise: bring a user's settled usage that is behind the last snapshot back up to it.
-- A promoted replica (asynchronous replication loses the last writes on a failover),
-- or a Redis restarted from an old RDB file, is not empty, so restore.lua never runs:
-- its counters are simply lower than what the database copied from the old primary.
-- KEYS[1] user base B, KEYS[2] index base I (the user's shard on a cluster).
-- ARGV: 1 user id, 2 now (0 = Redis' clock), 3 the generation the snapshot copied,
--       4 month, 5 month end, 6 today ('' when the month is not the current one),
--       7 today's end, then field/value pairs of B:u:<month> as the snapshot holds
--       them ("req|<model>", count, "base|<model>", count, ...).
-- Returns the base tokens added (0: nothing was behind, or nothing may be raised).
-- Each field goes to max(current, snapshot), never current + snapshot: run twice, or
-- after a settle that already passed the snapshot, it adds nothing more; atomic, so a
-- reserve or settle is either wholly before it or wholly after it.

local B, I = KEYS[1], KEYS[2]
local uid = ARGV[1]
local now = now_ms(ARGV[2])
local month, month_end = ARGV[4], tonumber(ARGV[5])
local day, day_end = ARGV[6], tonumber(ARGV[7])

-- Step 1: counters lost whole are restore.lua's (it adds the database's figures once,
-- on the next request); a month whose counters would have expired stays in the database.
local s = redis.call('HMGET', B .. ':s', 'seen', 'gen')
if not s[1] or month_end + MONTH_GRACE <= now then return 0 end

-- Step 2: a different generation means an admin reset since the snapshot (reset.lua):
-- Redis' lower figures are the forgiven ones, and stand.
if num(s[2]) ~= num(ARGV[3]) then return 0 end

-- Step 3: each settled field up to the snapshot's figure; the base tokens added are
-- the settles the replica missed.
local u = B .. ':u:' .. month
local added = 0
for i = 8, #ARGV, 2 do
  local field, target = ARGV[i], tonumber(ARGV[i + 1])
  local short = target - num(redis.call('HGET', u, field))
  if short > 0 then
    redis.call('HINCRBY', u, field, short)
    if string.sub(field, 1, 5) == 'base|' then added = added + short end
  end
end
if added == 0 then return 0 end
redis.call('PEXPIREAT', u, month_end + MONTH_GRACE)

-- Step 4: the month's and today's counters (used + reserved) by the same amount: the
-- missed settles were charged there too. Today's may have been charged yesterday
-- (a snapshot just after midnight): that errs towards refusing, never overspending.
add_period(B .. ':m:' .. month, added, month_end + MONTH_GRACE)
if day ~= '' and day_end > now then
  add_period(B .. ':d:' .. day, added, day_end + DAY_GRACE)
end

-- Step 5: listed as active now, so the next snapshot run copies the raised month.
local a = I .. ':a:' .. month
redis.call('ZADD', a, now, uid)
redis.call('PEXPIREAT', a, month_end + MONTH_GRACE)
return added
