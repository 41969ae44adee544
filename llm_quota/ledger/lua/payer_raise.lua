-- payer_raise: bring a payer's (an API key's, a team's) settled month that is behind
-- the last snapshot back up to it, as raise.lua does a user's. A promoted replica, or
-- a Redis restarted from an old file, is not empty, so key_restore.lua and
-- team_restore.lua never run: its counters are simply lower than the database's.
-- KEYS[1] the payer's base P (a key's K, in its user's slot; a team's T, its own slot),
-- KEYS[2] the base whose state hash vouches for P's counters (a key's user B: a key is
--         restored with its user; a team's T itself: team_restore.lua).
-- ARGV: 1 now (0 = Redis' clock), 2 the generation the snapshot copied, 3 month,
--       4 month end, 5 today ('' when the month is not the current one), 6 today's end,
--       then field/value pairs of P:n:<month> as the snapshot holds them ("req", count,
--       "base", count, "base|u:<uid>", count, ...).
-- Returns the base tokens added (the plain "base" total's lift; 0: nothing was
-- behind, or nothing may be raised).
-- Each field goes to max(current, snapshot), never current + snapshot: run twice, or
-- after a settle that already passed the snapshot, it adds nothing more; atomic, so a
-- reserve or settle is either wholly before it or wholly after it.

local P, S = KEYS[1], KEYS[2]
local now = now_ms(ARGV[1])
local month, month_end = ARGV[3], tonumber(ARGV[4])
local day, day_end = ARGV[5], tonumber(ARGV[6])

-- Step 1: counters lost whole are the restore scripts' (they add the database's
-- figures once, before the next decision); a month whose counters would have expired
-- stays in the database.
if redis.call('HEXISTS', S .. ':s', 'seen') == 0 or month_end + MONTH_GRACE <= now then
  return 0
end

-- Step 2: a different generation means a reset since the snapshot (share_reset.lua):
-- Redis' lower figures are the forgiven ones, and stand.
if num(redis.call('HGET', P .. ':s', 'gen')) ~= num(ARGV[2]) then return 0 end

-- Step 3: each settled field up to the snapshot's figure; the plain total's lift is
-- what the replica missed (the member and model fields are shares of it).
local n = P .. ':n:' .. month
local added, lifted = 0, false
for i = 7, #ARGV, 2 do
  local field, target = ARGV[i], tonumber(ARGV[i + 1])
  local short = target - num(redis.call('HGET', n, field))
  if short > 0 then
    redis.call('HINCRBY', n, field, short)
    lifted = true
    if field == 'base' then added = short end
  end
end
if lifted then redis.call('PEXPIREAT', n, month_end + MONTH_GRACE) end
if added == 0 then return 0 end

-- Step 4: the month's and today's counters (used + reserved) by the same amount: the
-- missed settles were charged there too. Today's may have been charged yesterday
-- (a snapshot just after midnight): that errs towards refusing, never overspending.
add_period(P .. ':m:' .. month, added, month_end + MONTH_GRACE)
if day ~= '' and day_end > now then
  add_period(P .. ':d:' .. day, added, day_end + DAY_GRACE)
end
return added
