-- global_raise: bring the global caps' day and month counters that are behind the
-- snapshots (everyone's figures summed) back up to them, as raise.lua does a user's.
-- Time is in milliseconds in this script; amounts are base tokens.
-- KEYS[1] global base G (its own slot on a cluster).
-- ARGV: 1 now (0 = Redis' clock), 2 today, 3 its end, 4 everyone's day in the
--       snapshots, 5 month, 6 its end, 7 everyone's month in the snapshots.
-- Returns {base tokens added to the day, to the month}.
-- The month is raised to everyone's settled month, the day by as much (at most) as
-- the month was, as raise.lua raises a user's day.
-- No generation here: nothing resets the global counters (a user's or a team's reset
-- keeps the usage there: the money was spent), so within a period they only grow, and
-- a counter below everyone's snapshot lost writes. A counter goes to max(current,
-- snapshot), never current + snapshot: run twice, it adds nothing more.

local G = KEYS[1]
local now = now_ms(ARGV[1])

-- Step 1: counters lost whole are global_restore.lua's (it adds the database's
-- figures once, on the next request under a global cap).
if redis.call('HEXISTS', G .. ':s', 'seen') == 0 then return {0, 0} end

-- Step 2: the month up to everyone's settled month, if it may still be read. Settled
-- usage never exceeds the counter (used + reserved), so only lost writes lift it.
local function lift(key, short, expire_at)
  if short <= 0 then return 0 end
  add_period(key, short, expire_at)
  return short
end
local day_key, month_key = G .. ':d:' .. ARGV[2], G .. ':m:' .. ARGV[5]
local day_end, month_end = tonumber(ARGV[3]), tonumber(ARGV[6])
local month_added = 0
if month_end + MONTH_GRACE > now then
  month_added = lift(month_key, tonumber(ARGV[7]) - num(redis.call('GET', month_key)),
    month_end + MONTH_GRACE)
end

-- Step 3: the day up to everyone's day counters, by no more than the month was: the
-- writes a failover lost moved both alike, while a user's day counter may still hold
-- an abandoned reservation's estimate that the global share already gave back (the
-- user's housekeeping has not run): that must not read as lost writes.
local day_added = 0
if day_end > now then
  local short = tonumber(ARGV[4]) - num(redis.call('GET', day_key))
  day_added = lift(day_key, math.min(short, month_added), day_end + DAY_GRACE)
end
return {day_added, month_added}
