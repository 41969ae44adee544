-- Time is in milliseconds in every script; amounts are integer base tokens.
-- redis_ledger.py prepends this file to each script, so helpers are shared, not copied.
--
-- Keys under a user's base B = "<prefix>:{u:<id>}" (one hash tag, one cluster slot):
--   B:w          ZSET reservation id -> admission time   (sliding request window)
--   B:wt         HASH reservation id -> tokens in the sliding token window, "_sum" = total
--   B:p          ZSET reservation id -> lease expiry      (unsettled reservations; their
--                                                         count is the concurrency in use)
--   B:rr         HASH reservation id -> record "state|amount|day|month|month_end|global|model"
--                     state: p pending, x expired (estimate given back), s settled, l released
--   B:z          ZSET reservation id -> when its finished record may be forgotten
--   B:s          HASH "reserved" (sum of pending estimates), "seen" (counters are trusted)
--   B:d:<day>    STRING base tokens used + reserved that calendar day
--   B:m:<month>  STRING base tokens used + reserved that calendar month
--   B:u:<month>  HASH "req|<model>", "in|<model>", "out|<model>", "base|<model>" (settled)
-- Global base G = "<prefix>:{g}": G:d:<day>, G:m:<month> (only while a global cap is set).
-- Index base I = "<prefix>:{idx}": I:a:<month> ZSET user id -> last settle time.

local WINDOW = 60000
local DAY_GRACE = 86400000           -- a day counter outlives its day by one day
local MONTH_GRACE = 8 * 86400000     -- a month counter stays for the snapshot of a closed month
local STRUCT_TTL = 40 * 86400000     -- outlives every month counter, so "seen" is never stale
local BATCH = 200                    -- bounded work per step; unpack() has a stack limit

-- The caller may pin the clock (tests, replays); otherwise Redis' own clock decides,
-- so app servers with skewed clocks still agree on windows and periods.
local function now_ms(given)
  local n = tonumber(given)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function split(csv)
  local out = {}
  for part in string.gmatch(csv, '[^,]+') do out[#out + 1] = part end
  return out
end

-- Periods are calendar days/months in the caller's PERIOD_TIMEZONE, which Lua cannot
-- compute (DST). The caller sends the previous, current and next period ids with their
-- start instants (one more start for the last end); we pick by server time.
local function pick_period(ids_csv, starts_csv, now)
  local ids, starts = split(ids_csv), split(starts_csv)
  local chosen = 1
  for i = 1, #ids do
    if tonumber(starts[i]) <= now then chosen = i end
  end
  return ids[chosen], tonumber(starts[chosen + 1])
end

-- Exact ceil(a / b) for non-negative integers held in doubles.
local function ceil_div(a, b)
  local q = math.floor(a / b)
  while q * b < a do q = q + 1 end
  while q > 0 and (q - 1) * b >= a do q = q - 1 end
  return q
end

local function parse_record(rec)
  local state, amount, day, month, month_end, g, model =
    string.match(rec, '^(%a)|(%-?%d+)|(%d+)|(%d+)|(%d+)|(%d)|(.*)$')
  return state, tonumber(amount), day, month, tonumber(month_end), g, model
end

local function record(state, amount, day, month, month_end, g, model)
  return state .. '|' .. amount .. '|' .. day .. '|' .. month .. '|' .. month_end .. '|' .. g .. '|' .. model
end

-- Add to a period counter, giving a new counter the expiry of its period.
local function add_period(key, amount, expire_at)
  if redis.call('INCRBY', key, amount) == amount then
    redis.call('PEXPIREAT', key, expire_at)
  end
end

-- Correct a counter that a reservation already touched. A counter that has expired
-- belongs to a long-closed period: giving back to it would create a key with no
-- expiry, so only a late charge recreates it.
local function adjust(key, delta, now)
  if delta == 0 then return end
  if redis.call('EXISTS', key) == 1 then
    redis.call('INCRBY', key, delta)
  elseif delta > 0 then
    redis.call('INCRBY', key, delta)
    redis.call('PEXPIRE', key, DAY_GRACE)
  end
end

-- Move a reservation's amount in the sliding token window, if it is still in it.
local function adjust_window(B, rid, amount)
  local held = redis.call('HGET', B .. ':wt', rid)
  if held then
    redis.call('HSET', B .. ':wt', rid, amount)
    redis.call('HINCRBY', B .. ':wt', '_sum', amount - tonumber(held))
  end
end

-- Give a pending reservation's estimate back to every counter it was taken from.
local function unreserve(B, G, rid, est, day, month, g, now)
  adjust(B .. ':d:' .. day, -est, now)
  adjust(B .. ':m:' .. month, -est, now)
  if g == '1' then
    adjust(G .. ':d:' .. day, -est, now)
    adjust(G .. ':m:' .. month, -est, now)
  end
  redis.call('HINCRBY', B .. ':s', 'reserved', -est)
  redis.call('ZREM', B .. ':p', rid)
  adjust_window(B, rid, 0)
end

-- Entries older than the window leave it, and their tokens leave the running sum.
local function trim_window(B, now)
  while true do
    local old = redis.call('ZRANGEBYSCORE', B .. ':w', '-inf', now - WINDOW, 'LIMIT', 0, BATCH)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', B .. ':wt', unpack(old))
    local freed = 0
    for i = 1, #old do freed = freed + (tonumber(amounts[i]) or 0) end
    redis.call('HDEL', B .. ':wt', unpack(old))
    if freed ~= 0 then redis.call('HINCRBY', B .. ':wt', '_sum', -freed) end
    redis.call('ZREM', B .. ':w', unpack(old))
  end
end

-- Reservations whose lease ran out (a crashed worker, a forgotten settle) give their
-- tokens and their concurrency slot back, so nobody is refused for phantom usage.
-- Their record stays for one more TTL so a late settle still charges the real usage.
local function reclaim(B, G, now, ttl)
  while true do
    local rids = redis.call('ZRANGEBYSCORE', B .. ':p', '-inf', now, 'LIMIT', 0, BATCH)
    if #rids == 0 then return end
    for i = 1, #rids do
      local rid = rids[i]
      local rec = redis.call('HGET', B .. ':rr', rid)
      if rec then
        local state, est, day, month, month_end, g, model = parse_record(rec)
        if state == 'p' then
          unreserve(B, G, rid, est, day, month, g, now)
          redis.call('HSET', B .. ':rr', rid, record('x', est, day, month, month_end, g, model))
          redis.call('ZADD', B .. ':z', now + ttl, rid)
        end
      end
    end
    redis.call('ZREM', B .. ':p', unpack(rids))
  end
end

-- Finished records are kept for one TTL (idempotent settle), then dropped.
local function forget(B, now)
  local rids = redis.call('ZRANGEBYSCORE', B .. ':z', '-inf', now, 'LIMIT', 0, BATCH)
  if #rids > 0 then
    redis.call('HDEL', B .. ':rr', unpack(rids))
    redis.call('ZREM', B .. ':z', unpack(rids))
  end
end

local function housekeeping(B, G, now, ttl)
  trim_window(B, now)
  reclaim(B, G, now, ttl)
  forget(B, now)
end

-- The per-user structures live as long as any counter that may depend on them.
local function touch(B, now)
  local at = now + STRUCT_TTL
  for _, suffix in ipairs({':w', ':wt', ':p', ':rr', ':z', ':s'}) do
    redis.call('PEXPIREAT', B .. suffix, at)
  end
end

local function num(v)
  return tonumber(v) or 0
end
