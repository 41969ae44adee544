-- Time is in milliseconds in every script; amounts are integer base tokens.
-- The ledger prepends this file to each script, so helpers are shared, not copied.
--
-- Keys under a user's base B = "<prefix>:{u:<id>}" (one hash tag, one cluster slot):
--   B:w          ZSET reservation id -> admission time   (sliding request window)
--   B:p          ZSET reservation id -> lease expiry      (unsettled reservations; their
--                                                         count is the concurrency in use)
--   B:rr         HASH reservation id -> record "state|amount|day|month|month_end|global|model"
--                     state: p pending, x expired (estimate given back), s settled, l released
--                     (perhaps before its reserve arrived: tombstone())
--                     amount: what the reservation holds in the token window now (the
--                     estimate while pending, the actual once settled, 0 once given back)
--                     global: 1 if the same script also holds a share in G (one Redis)
--   B:z          ZSET reservation id -> when its finished record may be forgotten
--   B:s          HASH "seen" (counters are trusted), "wsum" (tokens of the entries in B:w),
--                     "t" (day the TTLs were refreshed), and reserve's housekeeping dates:
--                     "pdue" (no lease in B:p expires before it; -1: B:p is empty) and
--                     "zdue" (no tombstone in B:z is due to go before it)
--   B:d:<day>    STRING base tokens used + reserved that calendar day
--   B:m:<month>  STRING base tokens used + reserved that calendar month
--   B:u:<month>  HASH "req|<model>", "in|<model>", "out|<model>", "base|<model>" (settled)
-- Global base G = "<prefix>:{g}" (its own slot; used only while a global cap is set):
--   G:d:<day>, G:m:<month>  base tokens used + reserved by everyone
--   G:p, G:rr, G:z          the global shares' own leases, records and tombstones, so a
--                           share expires with its lease even where no user script can
--                           reach G (Redis Cluster) and no user returns to reclaim it
-- Payers besides the user, each a share base P (below) with P:w ZSET reservation id ->
-- admission time (its sliding request window) and P:n:<month> HASH of its settled
-- usage ("req", "in", "out", "base", each followed by the caller's field suffixes):
--   API key base K = B .. ":k:<key id>" (the user's hash tag, so the user's slot);
--   team base T = "<prefix>:{t:<team id>}" (its own slot: on a cluster a second step,
--   team_reserve.lua, as for the global caps).
-- On one Redis the user scripts take G as a second key and do both in one round trip.
-- On a cluster B and G are on different slots: the user's script runs first, then
-- global_*.lua on G (global_reserve refusing means amend.lua withdraws the first step).
-- Index base I: "<prefix>:{idx}" on one Redis; on a cluster one base per slot,
-- "<prefix>:{idx:<n>}", whose tag hashes to the user's own slot, so settle stays
-- single-slot. I:a:<month> ZSET user id -> last settle time.

local WINDOW = 60000
local DAY_GRACE = 86400000           -- a day counter outlives its day by one day
local MONTH_GRACE = 8 * 86400000     -- a month counter stays for the snapshot of a closed month
local STRUCT_TTL = 40 * 86400000     -- outlives every month counter, so "seen" is never stale
local BATCH = 200                    -- bounded work per step; unpack() has a stack limit
local WINDOW_LIFE = '61000'          -- a payer's window outlives its newest entry by this
local FRONT = 8                      -- window entries reserve reads at once (see window_front)
local FORGET_EVERY = 5000            -- tombstones may outlive their TTL by this much (ms)
local FORGET_ROUNDS = 5              -- batches of tombstones one reserve may drop

-- The caller may pin the clock (tests, replays); otherwise Redis' own clock decides,
-- so app servers with skewed clocks still agree on windows and periods.
local function now_ms(given)
  local n = tonumber(given)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(v)
  return tonumber(v) or 0
end

local function split(csv)
  local out = {}
  for part in string.gmatch(csv, '[^,]+') do out[#out + 1] = part end
  return out
end

-- Periods are calendar days/months in the caller's PERIOD_TIMEZONE, which Lua cannot
-- compute (DST). The caller sends the previous, current and next period ids with their
-- start instants (one more start for the last end); we pick by server time.
-- Returns the period's id, its end and its start, and its end as the caller sent it
-- (a string, so that nothing formats it again: see taking()).
local function pick_period(ids_csv, starts_csv, now)
  local ids, starts = split(ids_csv), split(starts_csv)
  local chosen = 1
  for i = 1, #ids do
    if tonumber(starts[i]) <= now then chosen = i end
  end
  return ids[chosen], tonumber(starts[chosen + 1]), tonumber(starts[chosen]), starts[chosen + 1]
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

-- Add to a period counter, giving a new counter the expiry of its period. `sent`:
-- the amount as a string, where the caller has formatted it once (see taking()).
local function add_period(key, amount, expire_at, sent)
  if redis.call('INCRBY', key, sent or amount) == amount then
    redis.call('PEXPIREAT', key, expire_at)
  end
end

-- Correct a counter that a reservation already touched: one INCRBY. Only when the
-- result shows the key was absent (a long-closed period, or a reset) is it looked at
-- again: a give-back must not leave a negative key with no expiry behind, and a late
-- charge gets a day to be read.
local function adjust(key, delta, now)
  if delta == 0 then return end
  local after = redis.call('INCRBY', key, delta)
  if after == delta and redis.call('PTTL', key) == -1 then
    if delta < 0 then redis.call('DEL', key) else redis.call('PEXPIRE', key, DAY_GRACE) end
  end
end

-- Move a reservation's tokens in the sliding window from `old` to `new`, if its entry
-- is still in the window; the record, rewritten by the caller, then holds `new`.
local function adjust_window(B, rid, old, new)
  if old ~= new and redis.call('ZSCORE', B .. ':w', rid) then
    redis.call('HINCRBY', B .. ':s', 'wsum', new - old)
  end
end

-- Give a pending reservation's estimate back to every user counter it was taken from
-- (what is still pending is not summed apart: pending_total() reads it from B:p).
local function unreserve(B, rid, est, day, month, now)
  adjust(B .. ':d:' .. day, -est, now)
  adjust(B .. ':m:' .. month, -est, now)
  redis.call('ZREM', B .. ':p', rid)
  adjust_window(B, rid, est, 0)
end

-- The tokens a record holds in the window (0 for a missing record: data lost).
local function window_amount(rec)
  if not rec then return 0 end
  return tonumber(string.match(rec, '^%a|(%-?%d+)|')) or 0
end

-- Entries older than the window leave it; returns the tokens they held, which the
-- caller takes off "wsum". A record outlives its window entry (its tombstone lasts a
-- TTL of at least 60 s), so the amount is read from it rather than kept twice.
local function trim_window(B, now)
  local freed = 0
  while true do
    local old = redis.call('ZRANGEBYSCORE', B .. ':w', '-inf', now - WINDOW, 'LIMIT', 0, BATCH)
    if #old == 0 then return freed end
    local recs = redis.call('HMGET', B .. ':rr', unpack(old))
    for i = 1, #old do freed = freed + window_amount(recs[i]) end
    redis.call('ZREM', B .. ':w', unpack(old))
    if #old < BATCH then return freed end
  end
end

-- Reserve's trim: the window's oldest FRONT entries, read at once, usually hold every
-- expired one (one or two leave per request in a steady stream) and the oldest live
-- one, whose age the reset headers need. Returns the tokens freed and that oldest
-- admission time (nil: the window is empty).
local function window_front(B, now)
  local front = redis.call('ZRANGE', B .. ':w', 0, FRONT - 1, 'WITHSCORES')
  local old, oldest = {}, nil
  for i = 1, #front, 2 do
    local at = tonumber(front[i + 1])
    if at > now - WINDOW then
      oldest = at
      break
    end
    old[#old + 1] = front[i]
  end
  local freed = 0
  if #old > 0 then
    local recs = redis.call('HMGET', B .. ':rr', unpack(old))
    for i = 1, #old do freed = freed + window_amount(recs[i]) end
    redis.call('ZREM', B .. ':w', unpack(old))
  end
  if oldest == nil and #front == 2 * FRONT then
    -- All of them had expired (the user was away): trim in batches, then look again.
    freed = freed + trim_window(B, now)
    local first = redis.call('ZRANGE', B .. ':w', 0, 0, 'WITHSCORES')
    if #first > 0 then oldest = tonumber(first[2]) end
  end
  return freed, oldest
end

-- An id released before Redis saw its reserve (the caller gave up on that reserve's
-- reply, and the reserve may still arrive): a tombstone like a release's, without the
-- periods it never had, so reserve.lua and global_reserve.lua refuse the id. P is a
-- user's B or the global G; the structures expire even if nobody comes back.
local function tombstone(P, rid, now, ttl)
  redis.call('HSET', P .. ':rr', rid, record('l', 0, 0, 0, 0, 0, ''))
  redis.call('ZADD', P .. ':z', now + ttl, rid)
  redis.call('PEXPIREAT', P .. ':rr', now + STRUCT_TTL)
  redis.call('PEXPIREAT', P .. ':z', now + STRUCT_TTL)
end

-- Move a pending reservation's lease in P (a user's B or the global G) out to `lease_end`,
-- never in. Returns the record's global flag if it is pending (renewed), else nil: a
-- settled, released or expired reservation keeps its state.
local function renew_lease(P, rid, lease_end)
  local rec = redis.call('HGET', P .. ':rr', rid)
  if not rec then return nil end
  local state, _, _, _, _, g = parse_record(rec)
  if state ~= 'p' then return nil end
  local lease = tonumber(redis.call('ZSCORE', P .. ':p', rid))
  if lease and lease < lease_end then redis.call('ZADD', P .. ':p', lease_end, rid) end
  return g
end

-- Reservations whose lease ran out (a crashed worker, a forgotten settle) give their
-- tokens and their concurrency slot back, so nobody is refused for phantom usage.
-- Their record stays for one more TTL so a late settle still charges the real usage.
-- P is any base with :p, :rr and :z (a user's B or the global G); give_back(rid, est,
-- day, month, P, now) undoes the reservation in P's counters.
local function reclaim(P, now, ttl, give_back)
  local expired = false
  while true do
    local rids = redis.call('ZRANGEBYSCORE', P .. ':p', '-inf', now, 'LIMIT', 0, BATCH)
    if #rids == 0 then return end
    for i = 1, #rids do
      local rid = rids[i]
      local rec = redis.call('HGET', P .. ':rr', rid)
      if rec then
        local state, est, day, month, month_end, g, model = parse_record(rec)
        if state == 'p' then
          give_back(rid, est, day, month, P, now)
          redis.call('HSET', P .. ':rr', rid, record('x', 0, day, month, month_end, g, model))
          redis.call('ZADD', P .. ':z', now + ttl, rid)
          expired = true
        end
      end
    end
    redis.call('ZREM', P .. ':p', unpack(rids))
    -- Whoever writes a tombstone gives P:z its life, which may be new: nobody may
    -- come back to reserve (share_take does not refresh P:z).
    if expired then redis.call('PEXPIREAT', P .. ':z', now + STRUCT_TTL) end
    if #rids < BATCH then return end
  end
end

-- Finished records are kept for one TTL (idempotent settle), then dropped, at most
-- `rounds` batches at a time. Returns true if more are due.
local function forget(P, now, rounds)
  for _ = 1, rounds or math.huge do
    local rids = redis.call('ZRANGEBYSCORE', P .. ':z', '-inf', now, 'LIMIT', 0, BATCH)
    if #rids > 0 then
      redis.call('HDEL', P .. ':rr', unpack(rids))
      redis.call('ZREM', P .. ':z', unpack(rids))
    end
    if #rids < BATCH then return false end
  end
  return true
end

-- Housekeeping in full, for the scripts that run rarely (usage, reset).
local function housekeeping(B, now, ttl)
  local freed = trim_window(B, now)
  if freed ~= 0 then redis.call('HINCRBY', B .. ':s', 'wsum', -freed) end
  reclaim(B, now, ttl, function(rid, est, day, month) unreserve(B, rid, est, day, month, now) end)
  forget(B, now)
end

-- Note that `name` changed to `value` in a state hash's copy `state` (its HSET is
-- the caller's): the list of changes is made only when there is one, as most calls
-- change nothing (every table costs a script thousands of instructions).
local function mark_changed(state, name, value)
  local changed = state.changed
  if not changed then
    changed = {}
    state.changed = changed
  end
  changed[name] = value
end

-- Reserve's housekeeping of leases and tombstones runs only when the dates kept in
-- the state hash (a user's B:s, a payer's P:s) say something is due; `state` holds
-- their values and collects what changed (mark_changed), `give_back` undoes an expired lease in P's
-- counters. An old hash without the dates simply runs it once. Returns true if
-- expired leases were looked for (and perhaps given back).
local function due_housekeeping(P, now, ttl, state, give_back)
  local pdue = tonumber(state.pdue)
  state.pdue = pdue  -- lease_due() reads it again: converted once
  local reclaimed = false
  if pdue == nil or (pdue >= 0 and now >= pdue) then
    reclaim(P, now, ttl, give_back)
    local first = redis.call('ZRANGE', P .. ':p', 0, 0, 'WITHSCORES')
    state.pdue = -1
    if #first > 0 then state.pdue = tonumber(first[2]) end
    mark_changed(state, 'pdue', state.pdue)
    reclaimed = true
  end
  local zdue = tonumber(state.zdue)
  if zdue == nil or now >= zdue then
    -- A tombstone written from now on is due at now + ttl at the earliest.
    local next_due = now + ttl
    if forget(P, now, FORGET_ROUNDS) then
      next_due = now
    else
      local first = redis.call('ZRANGE', P .. ':z', 0, 0, 'WITHSCORES')
      if #first > 0 then next_due = math.max(tonumber(first[2]), now + FORGET_EVERY) end
    end
    mark_changed(state, 'zdue', next_due)
  end
  return reclaimed
end

-- A lease taken now is due at now + ttl: the state's due date moves in to it if the
-- date is later, or none is set (-1: no lease was pending at the last look).
local function lease_due(state, now, ttl)
  local pdue = tonumber(state.pdue)
  if pdue == nil or pdue < 0 or pdue > now + ttl then mark_changed(state, 'pdue', now + ttl) end
end

-- The estimates of the reservations still pending (their count is the concurrency).
local function pending_total(B)
  local rids = redis.call('ZRANGE', B .. ':p', 0, -1)
  local total = 0
  for start = 1, #rids, BATCH do
    local recs = redis.call('HMGET', B .. ':rr', unpack(rids, start, math.min(start + BATCH - 1, #rids)))
    for i = 1, #recs do
      if recs[i] then
        local state, est = parse_record(recs[i])
        if state == 'p' then total = total + est end
      end
    end
  end
  return total
end

-- The per-user structures live as long as any counter that may depend on them.
-- Refreshed once a day (the caller compares "t"), not on every request: STRUCT_TTL
-- has weeks to spare, and six PEXPIREATs on every call would be a large share of a
-- reserve's work.
local function touch(B, now)
  local at = now + STRUCT_TTL
  for _, suffix in ipairs({':w', ':p', ':rr', ':z', ':s'}) do
    redis.call('PEXPIREAT', B .. suffix, at)
  end
  redis.call('HSET', B .. ':s', 't', math.floor(now / 86400000))
end

-- Deciding on token limits. A limit is {name, limit (-1 = none), used, ends}, where
-- ends is the period's end instant, or 0 for the sliding minute.

-- The refusal is named by the limit that takes longest to clear, because a retry
-- before then would be refused again.
local function refusal()
  local r = {name = nil, wait = -1}
  function r.block(name, wait)
    if wait < 1 then wait = 1 end
    if wait > r.wait then r.name, r.wait = name, wait end
  end
  return r
end

local function least_headroom(limits)
  local headroom = nil
  for _, l in ipairs(limits) do
    if l[2] >= 0 and (headroom == nil or l[2] - l[3] < headroom) then headroom = l[2] - l[3] end
  end
  return headroom
end

-- The largest output cap whose cost fits `headroom`, and that cost.
local function clamp_output(prompt_micro, out_micro, headroom, max_out)
  local granted = max_out
  if out_micro > 0 then
    granted = math.floor((headroom * 1000000 - prompt_micro) / out_micro)
    while granted > 0 and ceil_div(prompt_micro + granted * out_micro, 1000000) > headroom do
      granted = granted - 1
    end
    if granted > max_out then granted = max_out end
  end
  return granted, ceil_div(prompt_micro + granted * out_micro, 1000000)
end

-- Fit a request into `limits`: returns the output cap it may have and what it costs,
-- clamped when allowed and worth it; otherwise reports each refusing limit to
-- `r.block` with `wait_for(limit, tokens_short)` and returns the full cost.
local function fit_tokens(limits, prompt_micro, out_micro, max_out, min_out, clamp, r, wait_for)
  local est_full = ceil_div(prompt_micro + max_out * out_micro, 1000000)
  local est_min = ceil_div(prompt_micro + math.min(min_out, max_out) * out_micro, 1000000)
  local headroom = least_headroom(limits)
  if headroom == nil or est_full <= headroom then return max_out, est_full end
  if clamp and est_min <= headroom then
    return clamp_output(prompt_micro, out_micro, headroom, max_out)
  end
  local need = est_full
  if clamp then need = est_min end
  for _, l in ipairs(limits) do
    if l[2] >= 0 and l[2] - l[3] < need then r.block(l[1], wait_for(l, need - (l[2] - l[3]))) end
  end
  return max_out, est_full
end

-- Shares: a payer besides the user (the global caps in G, an API key in K) holds its
-- own share of a reservation, with the same lifecycle as the user's: P:d:<day> and
-- P:m:<month> counters, and P:p, P:rr, P:z for its leases, records and tombstones, so
-- a share expires with its own lease whoever comes back. P is G or a K.

local function share_used(P, day, month)
  local used = redis.call('MGET', P .. ':d:' .. day, P .. ':m:' .. month)
  return num(used[1]), num(used[2])
end

local function share_give_back(P, est, day, month, now)
  adjust(P .. ':d:' .. day, -est, now)
  adjust(P .. ':m:' .. month, -est, now)
end

-- reclaim()'s give_back for a share: a function of the file, not a closure made anew
-- by every call (a payer's housekeeping runs on every reserve).
local function share_reclaimed(_, est, day, month, P, now)
  share_give_back(P, est, day, month, now)
end

local function share_housekeeping(P, now, ttl)
  reclaim(P, now, ttl, share_reclaimed)
  forget(P, now)
end

local function share_touch(P, now)
  local at = now + STRUCT_TTL
  for _, suffix in ipairs({':p', ':rr', ':z'}) do
    redis.call('PEXPIREAT', P .. suffix, at)
  end
end

-- What an admitted request takes: its id, estimate, periods and lease, with the
-- numbers that the user's and every payer's commands send formatted once (Lua
-- formats a number anew each time it is passed to redis.call or joined to a string:
-- about 3,500 instructions for a time in ms, as much as a small command; counted in
-- docs/pages/benchmarks.md). struct_s, the structures' expiry, is formatted by the
-- first share that needs it (share_take).
-- `month_end_s`: month_end as the caller sent it, if it has it (pick_period()).
local function taking(rid, est, day, day_end, month, month_end, now, ttl, month_end_s)
  local t = {rid = rid, est = est, est_s = tostring(est), now_s = tostring(now),
             lease_s = tostring(now + ttl), day = day, day_expire = day_end + DAY_GRACE,
             month = month, month_expire = month_end + MONTH_GRACE,
             month_end_s = month_end_s or tostring(month_end)}
  t.share_record = record('p', t.est_s, day, month, t.month_end_s, '1', '')
  return t
end

-- Take a share `t` (taking()) in P. `fresh`: whether P:p was empty before this lease,
-- where the caller counted it (nil: not known, so PTTL asks); `dkey`, `mkey`: P's day
-- and month counters' names, where the caller has built them.
local function share_take(P, t, now, fresh, dkey, mkey)
  add_period(dkey or (P .. ':d:' .. t.day), t.est, t.day_expire, t.est_s)
  add_period(mkey or (P .. ':m:' .. t.month), t.est, t.month_expire, t.est_s)
  redis.call('ZADD', P .. ':p', t.lease_s, t.rid)
  redis.call('HSET', P .. ':rr', t.rid, t.share_record)
  -- The lives of what this writes (the lease set and the records) are refreshed when
  -- the lease set is new (no TTL yet), and by every settle (share_settle): one PTTL
  -- here rather than two PEXPIREATs on every reserve. Only share_take creates P:p,
  -- always with this refresh, so a set that was not empty has its TTL, and a caller
  -- who counted it needs no PTTL. P:z is not written here: its writers give it its life.
  if fresh == nil then fresh = redis.call('PTTL', P .. ':p') < 0 end
  if fresh then
    if not t.struct_s then t.struct_s = tostring(now + STRUCT_TTL) end
    redis.call('PEXPIREAT', P .. ':p', t.struct_s)
    redis.call('PEXPIREAT', P .. ':rr', t.struct_s)
  end
end

-- Replace a share's estimate by the actual usage, once. Without a record (lost,
-- or long forgotten) the usage is charged whole only if the caller says the user's
-- side was charged now (charge_missing); otherwise this only completes a share left
-- pending by a settle that died between its two steps. Returns the delta applied.
local function share_settle(P, rid, actual, day, month, month_end, charge_missing, now, ttl)
  local state, est = 'x', 0
  local rec = redis.call('HGET', P .. ':rr', rid)
  if rec then
    state, est, day, month, month_end = parse_record(rec)
  elseif not charge_missing then
    return 0
  end
  if state == 's' or state == 'l' then return 0 end
  local delta = actual
  if state == 'p' then
    delta = actual - est
    redis.call('ZREM', P .. ':p', rid)
  end
  adjust(P .. ':d:' .. day, delta, now)
  adjust(P .. ':m:' .. month, delta, now)
  redis.call('HSET', P .. ':rr', rid, record('s', actual, day, month, month_end, '1', ''))
  redis.call('ZADD', P .. ':z', now + ttl, rid)
  share_touch(P, now)
  return delta
end

-- Give a pending share back whole. Returns 1 if it was pending. A share P has
-- not seen yet is tombstoned: its global_reserve may still arrive, and must take nothing.
local function share_release(P, rid, now, ttl)
  local rec = redis.call('HGET', P .. ':rr', rid)
  if not rec then
    tombstone(P, rid, now, ttl)
    return 0
  end
  local state, est, day, month, month_end = parse_record(rec)
  if state ~= 'p' then return 0 end
  share_give_back(P, est, day, month, now)
  redis.call('ZREM', P .. ':p', rid)
  redis.call('HSET', P .. ':rr', rid, record('l', 0, day, month, month_end, '1', ''))
  redis.call('ZADD', P .. ':z', now + ttl, rid)
  redis.call('PEXPIREAT', P .. ':z', now + STRUCT_TTL)  -- as reclaim() does
  return 1
end

-- Lower a pending share to `amount` (a cluster's global step clamped harder than the
-- user's), or withdraw it whole (amount 0: refused there, as if never admitted).
local function share_amend(P, rid, amount, now, ttl)
  if amount <= 0 then return share_release(P, rid, now, ttl) end
  local rec = redis.call('HGET', P .. ':rr', rid)
  if not rec then return 0 end
  local state, est, day, month, month_end = parse_record(rec)
  if state ~= 'p' or est <= amount then return 0 end
  share_give_back(P, est - amount, day, month, now)
  redis.call('HSET', P .. ':rr', rid, record('p', amount, day, month, month_end, '1', ''))
  return 1
end

-- A payer's request window (P:w): what it holds after the old entries leave, and when
-- its oldest entry leaves (ms from now; WINDOW when empty).
local function payer_window(K, now)
  redis.call('ZREMRANGEBYSCORE', K .. ':w', '-inf', now - WINDOW)
  local count = redis.call('ZCARD', K .. ':w')
  local reset = WINDOW
  local first = redis.call('ZRANGE', K .. ':w', 0, 0, 'WITHSCORES')
  if #first > 0 then reset = tonumber(first[2]) + WINDOW - now end
  return count, reset
end

-- The wait until a payer's window has room for one more request under `rpm`: until its
-- (count - rpm + 1)-th oldest entry leaves.
local function payer_window_wait(K, now, count, rpm, reset)
  local nth = count - rpm
  if nth <= 0 then return reset end
  local entry = redis.call('ZRANGE', K .. ':w', nth, nth, 'WITHSCORES')
  if #entry > 0 then return tonumber(entry[2]) + WINDOW - now end
  return reset
end


-- Payers as a reserve sees them: {label, base, rpm, conc, tpd, tpmo} (-1 = unlimited)
-- and their burn-rate breaker {mult, floor, pause} (-1 = off; burn.lua), read from
-- ARGV from `at` on (eight values each) with their bases from KEYS from 2 on.
-- The breaker's three values are read only when it is on (a multiplier of '-1': off).
local PAYER_ARGS = 8
local function parse_payers(count, at)
  local payers = {}
  for i = 1, count do
    local a = at + (i - 1) * PAYER_ARGS
    local base = KEYS[1 + i]
    local p = {label = ARGV[a], base = base, rpm = tonumber(ARGV[a + 1]),
               conc = tonumber(ARGV[a + 2]), tpd = tonumber(ARGV[a + 3]),
               tpmo = tonumber(ARGV[a + 4]), mult = -1, floor = -1, pause = -1,
               win = base .. ':w'}
    if ARGV[a + 5] ~= '-1' then
      p.mult, p.floor, p.pause = tonumber(ARGV[a + 5]), tonumber(ARGV[a + 6]),
        tonumber(ARGV[a + 7])
    end
    payers[i] = p
  end
  return payers
end

-- A payer's state hash P:s, read once per reserve: a team's restore marker ("seen",
-- its life refreshed daily through "t"; see payer_trusted), the dates its housekeeping
-- is due ("pdue", "zdue", kept as B:s keeps a user's), and the breaker's and minute's
-- fields (burn.lua), so that no later step reads the hash again.
-- Only the fields the payer uses are read: a small hash is searched field by field.
-- (The lists are built here, not as file-level constants: every script call runs this
-- file, and a reserve without payers should not pay for them.)
local function payer_state(p)
  if p.mult < 0 then  -- the usual case, without a list of names to build and walk
    local f
    if p.label == 'team.' then
      f = redis.call('HMGET', p.base .. ':s', 'pdue', 'zdue', 'seen', 't')
    else
      f = redis.call('HMGET', p.base .. ':s', 'pdue', 'zdue')
    end
    p.state = {pdue = f[1], zdue = f[2], seen = f[3], t = f[4]}
    return
  end
  local names = {'pdue', 'zdue'}
  if p.label == 'team.' then
    names[#names + 1] = 'seen'
    names[#names + 1] = 't'
  end
  if p.mult >= 0 then
    for _, name in ipairs({'bz', 'bb', 'bp', 'bx', 'mm', 'mc', 'mp'}) do
      names[#names + 1] = name
    end
  end
  local f = redis.call('HMGET', p.base .. ':s', unpack(names))
  local state = {}
  for i = 1, #names do state[names[i]] = f[i] end
  p.state = state
end

-- A team's counters are trusted once team_restore.lua has run since the last loss:
-- "seen" in P:s, as B:s has for a user. Its life is refreshed once a day ("t"), so an
-- idle team's marker outlives every month counter it vouches for, and then goes.
local function payer_trusted(p, now)
  if not p.state.seen then return false end
  local today = math.floor(now / 86400000)
  if tonumber(p.state.t) ~= today then
    redis.call('HSET', p.base .. ':s', 't', today)
    redis.call('PEXPIREAT', p.base .. ':s', now + STRUCT_TTL)
  end
  return true
end

-- Expired shares give their tokens back and old records go, when the payer's dates
-- say some are due (due_housekeeping, as for a user).
local function payer_housekeeping(p, now, ttl)
  due_housekeeping(p.base, now, ttl, p.state, share_reclaimed)
end

-- Count a payer's request window (old entries leave first) and its calls in flight.
-- Its period counters (p.day, p.month) are the caller's to read: reserve.lua reads
-- them in one MGET with the user's. `cut`: now - WINDOW, as a string (see taking()).
local function payer_read(p, now, cut)
  redis.call('ZREMRANGEBYSCORE', p.win, '-inf', cut or (now - WINDOW))
  p.requests = redis.call('ZCARD', p.win)
  p.inflight = 0
  if p.conc >= 0 then p.inflight = redis.call('ZCARD', p.base .. ':p') end
end

-- When a payer's oldest window entry leaves (ms from now; WINDOW when empty): read
-- only when a refusal or the headers need it.
local function payer_reset(p, now)
  if p.reset == nil then
    p.reset = WINDOW
    local first = redis.call('ZRANGE', p.win, 0, 0, 'WITHSCORES')
    if #first > 0 then p.reset = tonumber(first[2]) + WINDOW - now end
  end
  return p.reset
end

-- A payer's request and concurrency limits, reported to `r` as refusals.
local function payer_block_rates(p, r, now)
  if p.rpm >= 0 and p.requests + 1 > p.rpm then
    r.block(p.label .. 'requests_per_minute',
      payer_window_wait(p.base, now, p.requests, p.rpm, payer_reset(p, now)))
  end
  if p.conc >= 0 and p.inflight + 1 > p.conc then
    r.block(p.label .. 'max_concurrent_requests', 1000)
  end
end

-- A payer's token limits, in fit_tokens()'s form; one it does not set (-1) is left out,
-- as fit_tokens() would pass over it.
local function payer_token_limits(p, limits, day_end, month_end)
  if p.tpd >= 0 then
    limits[#limits + 1] = {p.label .. 'tokens_per_day', p.tpd, p.day, day_end}
  end
  if p.tpmo >= 0 then
    limits[#limits + 1] = {p.label .. 'tokens_per_month', p.tpmo, p.month, month_end}
  end
end

-- Take a payer's share `t` (taking()) of an admitted request, and count it in its
-- window, which lives a minute past it. Its leases were counted (payer_read) when it
-- has a concurrency limit; its counters' names were built where the caller read them.
-- `user_idle`: the user holds no lease (reserve.lua counted B:p). A payer's lease is
-- also its user's, so its lease set is then very likely new: refreshed without asking
-- (a refresh too many costs nothing but itself; one too few is what PTTL guards).
local function payer_take(p, t, now, ttl, user_idle)
  local fresh = nil
  if p.conc >= 0 then
    fresh = p.inflight == 0
  elseif user_idle then
    fresh = true
  end
  share_take(p.base, t, now, fresh, p.dkey, p.mkey)
  redis.call('ZADD', p.win, t.now_s, t.rid)
  redis.call('PEXPIRE', p.win, WINDOW_LIFE)
  lease_due(p.state, now, ttl)
end

-- Write what changed in a payer's state hash, in one HSET, whatever the decision. Such
-- a write is rare (housekeeping ran, or a lease brought the due date in), and the
-- hash lives STRUCT_TTL past it.
local function payer_save(p, now)
  if not p.state.changed then return end
  local fields = {}
  for name, value in pairs(p.state.changed) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  if #fields > 0 then
    redis.call('HSET', p.base .. ':s', unpack(fields))
    redis.call('PEXPIREAT', p.base .. ':s', now + STRUCT_TTL)
  end
end

-- Record a settled request in a payer's month: "req", "in", "out", "base", each once
-- per field suffix in the csv `suffixes` ('' for plain totals, '|u:<uid>' per member).
-- Returns the month's settled base tokens after this one (its plain "base" total; -1
-- without one): exactly one settle moves it over a soft limit, so the caller sees the
-- crossing in the reply.
local function payer_usage(P, month, month_end, suffixes, input, output, actual)
  local n = P .. ':n:' .. month
  local total = -1
  for suffix in string.gmatch(suffixes .. ',', '([^,]*),') do
    redis.call('HINCRBY', n, 'req' .. suffix, 1)
    redis.call('HINCRBY', n, 'in' .. suffix, input)
    redis.call('HINCRBY', n, 'out' .. suffix, output)
    local base = redis.call('HINCRBY', n, 'base' .. suffix, actual)
    if suffix == '' then total = base end
  end
  redis.call('PEXPIREAT', n, month_end + MONTH_GRACE)
  return total
end
