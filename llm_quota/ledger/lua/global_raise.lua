-- global_raise: bring the global caps' day and month counters that are behind the
-- snapshots (everyone's figures summed) back up to them, as raise.lua does a user's.
-- Time is in milliseconds in this script; amounts are base tokens.
-- KEYS[1] global base G (its own slot on a cluster).
-- ARGV: 1 now (0 = Redis' clock), 2 today, 3 its end, 4 everyone's day in the
--       snapshots, 5 month, 6 its end, 7 everyone's month in the snapshots.
-- Returns {base tokens added to the day, to the month}.
-- No generation here: nothing resets the global counters (a user's or a team's reset
-- keeps the usage there: the money was spent), so within a period they only grow, and
-- a counter below everyone's snapshot lost writes. A counter goes to max(current,
-- snapshot), never current + snapshot: run twice, it adds nothing more.

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: counters lost whole are global_restore.lua's (it adds the database's
-- figures once, on the next request under a global cap).
if redis.call('HEXISTS', G .. ':s', 'seen') == 0 then return {0, 0} end

-- Step 2: each counter up to everyone's snapshot, if its period is still open.
local function lift(key, target, expire_at)
  local short = target - num(redis.call('GET', key))
  if short <= 0 then return 0 end
  add_period(key, short, expire_at)
  return short
end
local day_added, month_added = 0, 0
local day_end, month_end = tonumber(ARGV[3]), tonumber(ARGV[6])
if day_end > now then
  day_added = lift(G .. ':d:' .. ARGV[2], tonumber(ARGV[4]), day_end + DAY_GRACE)
end
if month_end + MONTH_GRACE > now then
  month_added = lift(G .. ':m:' .. ARGV[5], tonumber(ARGV[7]), month_end + MONTH_GRACE)
end
return {day_added, month_added}
