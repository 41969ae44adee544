-- share_reset: forgive the current day and month of payers besides a user (an admin
-- action): a user's API keys with the user's reset, or a team.
-- KEYS: the payers' bases (all in one slot: a user's keys, or one team).
-- ARGV: 1 now (0 = Redis' clock), 2 ttl, 3 day ids, 4 day starts, 5 month ids,
--       6 month starts, 7 mark the counters trusted (1 for a team: see payer_trusted).
-- Returns {day, month, then each payer's month counter before}.
-- As reset.lua: calls in flight keep their shares; the settled month's usage goes, and
-- each payer starts a new generation (P:s "gen"), so the snapshot tells this reset
-- (Redis' lower figure stands) from writes a promoted replica missed (payer_raise.lua).

local now = now_ms(ARGV[1])
local ttl = tonumber(ARGV[2])
local day, day_end = pick_period(ARGV[3], ARGV[4], now)
local month, month_end = pick_period(ARGV[5], ARGV[6], now)
local reply = {day, month}

local function set_counter(key, value, expire_at)
  if redis.call('EXISTS', key) == 1 then
    redis.call('SET', key, value, 'KEEPTTL')
  elseif value > 0 then
    redis.call('SET', key, value, 'PXAT', expire_at)
  end
end

for _, P in ipairs(KEYS) do
  -- Step 1: abandoned shares give their estimates back first.
  share_housekeeping(P, now, ttl)
  -- Step 2: what shares in flight hold in these periods stays, to be settled later.
  local held_day, held_month = 0, 0
  local pending = redis.call('ZRANGE', P .. ':p', 0, -1)
  for start = 1, #pending, BATCH do
    local recs = redis.call('HMGET', P .. ':rr', unpack(pending, start, math.min(start + BATCH - 1, #pending)))
    for k = 1, #recs do
      if recs[k] then
        local state, est, rday, rmonth = parse_record(recs[k])
        if state == 'p' then
          if rday == day then held_day = held_day + est end
          if rmonth == month then held_month = held_month + est end
        end
      end
    end
  end
  -- Step 3: the period counters keep only what is in flight; the month's settled
  -- figures (total, by member, by model) go.
  reply[#reply + 1] = num(redis.call('GET', P .. ':m:' .. month))
  set_counter(P .. ':d:' .. day, held_day, day_end + DAY_GRACE)
  set_counter(P .. ':m:' .. month, held_month, month_end + MONTH_GRACE)
  redis.call('DEL', P .. ':n:' .. month)
  -- Step 4: a team's counters are authoritative now: restore must not add the
  -- database's old figures back.
  if ARGV[7] == '1' then
    redis.call('HSET', P .. ':s', 'seen', '1', 't', math.floor(now / 86400000))
  end
  -- Step 5: the new generation is the reset's time (at least the old one plus one),
  -- as reset.lua's: two resets never share a number.
  local gen = math.max(num(redis.call('HGET', P .. ':s', 'gen')) + 1, now)
  redis.call('HSET', P .. ':s', 'gen', gen)
  redis.call('PEXPIREAT', P .. ':s', now + STRUCT_TTL)
end
return reply
