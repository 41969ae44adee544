-- settle: replace a reservation's estimate by the real usage, once.
-- KEYS[1] user base B, KEYS[2] index base I (the user's shard on a cluster), then one
-- base per payer (ARGV[15] of them: a key's K; a team's T on one Redis only), then the
-- global base G, on one Redis only (a cluster settles T in payer_settle.lua and G in
-- global_settle.lua).
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 user id,
--       5 actual base tokens, 6 input tokens, 7 output tokens,
--       8 day, 9 month, 10 month end, 11 global (1/0), 12 model
--       (8-12 are the caller's copy of the record, used only if Redis lost it),
--       13 the pattern row that priced the model ('' for a row of its own name),
--       14 how many distinct names a month records before such names go under it,
--       15 how many payers follow, then two values each: its usage field suffixes
--       (csv, see payer_usage) and its member in the active-key index ('' for none).
-- Returns {outcome, charged, month_used, prior state, {each payer's month settled
-- after this, see payer_usage}}: outcome 1 settled, 0 already
-- settled or released (nothing changed), 2 settled late: the estimate had expired, so
-- the whole actual usage was charged on top. month_used is the settled base tokens of
-- the reservation's month after this settle (-1 if nothing changed), so the caller can
-- see a soft limit being crossed without another round trip. The prior state
-- (p, x, s, l) tells a cluster's second step what to do with the global share.

local B, I = KEYS[1], KEYS[2]
local npayers = tonumber(ARGV[15] or '0')
local G = KEYS[3 + npayers]
local now = now_ms(ARGV[1])
local rid, ttl, uid = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local actual, input, output = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])

-- Step 1: find the record. Without one (Redis lost it, or the tombstone aged out)
-- the usage is still real money: charge it from the caller's copy.
local rec = redis.call('HGET', B .. ':rr', rid)
local state, est, day, month, month_end, g, model
if rec then
  state, est, day, month, month_end, g, model = parse_record(rec)
else
  state, est, day, month, month_end, g, model =
    'x', 0, ARGV[8], ARGV[9], tonumber(ARGV[10]), ARGV[11], ARGV[12]
end

-- Step 2: a second settle, or a settle after release, changes nothing.
if state == 's' or state == 'l' then return {0, 0, -1, state} end

-- Step 3: counters move by the difference to what they already hold for it. The
-- global share keeps its own record (it may have expired on its own), so it works
-- out its own difference.
local delta = actual
if state == 'p' then delta = actual - est end
adjust(B .. ':d:' .. day, delta, now)
adjust(B .. ':m:' .. month, delta, now)
if G ~= nil and g == '1' then
  share_settle(G, rid, actual, day, month, month_end, true, now, ttl)
end
for i = 1, npayers do share_settle(KEYS[2 + i], rid, actual, day, month, month_end, true, now, ttl) end

-- Step 4: the reservation is no longer outstanding; its lease (concurrency) ends.
if state == 'p' then
  redis.call('ZREM', B .. ':p', rid)
  adjust_window(B, rid, est, actual)
end

-- Step 4b (burn.lua): the minute's spend, as it stands now, teaches the baseline;
-- each payer's (a key's, a team's) counts this settle in its own minute first.
burn_settled(B, now)
for i = 1, npayers do
  local P = KEYS[2 + i]
  burn_settled(P, now, payer_minute(P, now, actual))
end

-- Step 5: per-model usage of the reservation's month, for reports and snapshots.
-- The month's settled total is the sum over models (a few fields): summing here
-- keeps it exact after restores and resets, which rewrite this hash.
local u = B .. ':u:' .. month
local month_used, names, known = actual, 0, false
local fields = redis.call('HGETALL', u)
for i = 1, #fields, 2 do
  local kind = string.sub(fields[i], 1, 5)
  if kind == 'base|' then month_used = month_used + tonumber(fields[i + 1])
  elseif string.sub(kind, 1, 4) == 'req|' then
    names = names + 1
    if fields[i] == 'req|' .. model then known = true end
  end
end
-- A name only a pattern row prices is the caller's to invent: it gets fields of its
-- own while the month has fewer than ARGV[14] names, then goes under the pattern.
-- Decided here, atomically, so the hash (and the snapshot's rows) stay bounded.
local name = model
if ARGV[13] and ARGV[13] ~= '' and not known and names >= tonumber(ARGV[14]) then
  name = ARGV[13]
end
if redis.call('HINCRBY', u, 'req|' .. name, 1) == 1 then
  redis.call('PEXPIREAT', u, month_end + MONTH_GRACE)  -- a new model: perhaps a new hash
end
redis.call('HINCRBY', u, 'in|' .. name, input)
redis.call('HINCRBY', u, 'out|' .. name, output)
redis.call('HINCRBY', u, 'base|' .. name, actual)

-- Step 6: the snapshot finds active users through this index, never through KEYS.
local a = I .. ':a:' .. month
if redis.call('ZADD', a, now, uid) == 1 then
  redis.call('PEXPIREAT', a, month_end + MONTH_GRACE)  -- a new member: perhaps a new key
end

-- Step 6b: each payer's usage of the month; a key also goes into the index of active
-- keys, scored by this settle's time: the snapshot copies both, and that score is the
-- key's last use (no database write per request).
local payer_totals = {}
for i = 1, npayers do
  payer_totals[i] = payer_usage(KEYS[2 + i], month, month_end, ARGV[14 + 2 * i], input, output,
    actual)
  local member = ARGV[15 + 2 * i]
  if member ~= '' then
    local ka = I .. ':k:' .. month
    if redis.call('ZADD', ka, now, member) == 1 then
      redis.call('PEXPIREAT', ka, month_end + MONTH_GRACE)
    end
  end
end

-- Step 7: keep a tombstone for one TTL so retried settles stay idempotent.
redis.call('HSET', B .. ':rr', rid, record('s', actual, day, month, month_end, g, model))
redis.call('ZADD', B .. ':z', now + ttl, rid)
-- A user who never comes back never runs reserve's daily refresh: the tombstones
-- must expire on their own.
redis.call('PEXPIREAT', B .. ':z', now + STRUCT_TTL)
if state == 'p' then return {1, delta, month_used, state, payer_totals} end
return {2, delta, month_used, state, payer_totals}
