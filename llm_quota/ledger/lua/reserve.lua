-- reserve: check every limit and reserve the estimate in all of them, or in none.
-- Payers: the user always; then the API key the request came with and the team it is
-- charged to, if any (see parse_payers); the global caps.
-- KEYS[1] user base B; then one base per payer (ARGV[27] of them: a key's K, in B's
-- slot; a team's T, on one Redis only); then the global base G, on one Redis only. On
-- a cluster T and G are on other slots: team_reserve.lua and global_reserve.lua
-- check them in steps of their own.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl,
--       4 requests/min, 5 concurrent, 6 tokens/min, 7 tokens/day, 8 tokens/month,
--       9 global tokens/day, 10 global tokens/month   (-1 = unlimited),
--       11 prompt cost in micro base tokens, 12 micro base tokens per output token,
--       13 requested output tokens, 14 least output worth clamping to, 15 clamp (1/0),
--       16 model, 17 day ids, 18 day starts, 19 month ids, 20 month starts,
--       21 probe: a lower prompt cost in micro base tokens, or '' (none), 22 its clamp,
--       23 burn multiplier, 24 burn floor (base tokens a minute), 25 burn pause (ms)
--       (-1 = the breaker is off; burn.lua), 26 slow-down: the soft limit in percent
--       of a 'slow' tier (-1 = off; burn.lua's slowed_rates),
--       27 how many payers follow, then eight values each: label ('key.', 'team.'),
--       requests/min, concurrent, tokens/day, tokens/month, and its burn multiplier,
--       floor and pause (-1 = off; a key's are its user's tier's, a team's its own).
-- Returns {status, limit, retry_ms, granted_output, reserved, now, day, month,
--          requests_limit, requests_remaining, requests_reset_ms,
--          tokens_limit, tokens_remaining, tokens_reset_ms, month_end, day_end,
--          probe_limit, probe_retry_ms, tokens_window_ms, burn_tripped}
-- The tokens_* fields describe the token limit with the least remaining (minute, day
-- or month, the key's too; -1 when none is set) and tokens_window_ms its length, for
-- the headers; the requests_* fields the tighter of the user's and the key's rpm.
-- status: 1 admitted, 0 refused (limit names the binding one), 2 restore counters first
--         (the user's; the team's where limit is 'team.'),
--         3 this id is finished already (released before this reserve arrived),
--         4 restore the global caps' counters first.
-- The id is the caller's, made before the call, so a reserve runs at most once per id:
-- one sent again (a client's retry after a lost reply) is answered from what the first
-- one holds, and one that arrives after its caller gave up on it and released the id
-- (release.lua tombstones an id it has not seen) reserves nothing.
-- The probe serves a caller that priced a huge prompt by its byte count (an upper
-- bound) to skip tokenizing it: on a refusal it learns whether the prompt's lower
-- bound would be refused as well (probe_limit names the limit then, else ''), and so
-- whether counting exactly could change the answer.

local B = KEYS[1]
local payers = parse_payers(tonumber(ARGV[27] or '0'), 28)
local G = KEYS[2 + #payers]
local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])
local rpm, conc, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tpd, tpmo = tonumber(ARGV[7]), tonumber(ARGV[8])
local gtpd, gtpmo = tonumber(ARGV[9]), tonumber(ARGV[10])
local prompt_micro, out_micro = tonumber(ARGV[11]), tonumber(ARGV[12])
local max_out, min_out, clamp = tonumber(ARGV[13]), tonumber(ARGV[14]), ARGV[15] == '1'
local model = ARGV[16]
local day, day_end, day_start = pick_period(ARGV[17], ARGV[18], now)
local month, month_end, month_start, month_end_s = pick_period(ARGV[19], ARGV[20], now)
if G == nil then gtpd, gtpmo = -1, -1 end
local use_global = gtpd >= 0 or gtpmo >= 0

-- Step 1: an id with a finished record (or a tombstone) is not reserved again; one
-- still pending is answered in step 3b.
local prior = redis.call('HGET', B .. ':rr', rid)
if prior and string.sub(prior, 1, 1) ~= 'p' then
  return {3, '', 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end, day_end}
end

-- Step 1b: counters lost with Redis' data must be restored from the database before
-- they are trusted; the caller restores once and asks again.
local s = redis.call('HMGET', B .. ':s', 'seen', 't', 'wsum', 'pdue', 'zdue')
if not s[1] then
  return {2, '', 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end, day_end}
end
-- So must a team's (team_restore.lua): the reply names it, so the caller restores it.
-- Each payer's state hash is read here, once (payer_state).
for _, p in ipairs(payers) do
  payer_state(p)
  if p.label == 'team.' and not payer_trusted(p, now) then
    return {2, p.label, 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end, day_end}
  end
end
local state = {wsum = num(s[3]), pdue = s[4], zdue = s[5]}  -- changes: mark_changed()

-- Step 1c (issue 17): the global caps' counters, likewise (global_restore.lua). A
-- missing marker with this month's counter present means counters that were never
-- lost (kept from before the marker existed): mark them, restore nothing.
if use_global and redis.call('HEXISTS', G .. ':s', 'seen') == 0 then
  if redis.call('EXISTS', G .. ':m:' .. month) == 0 then
    return {4, '', 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end, day_end}
  end
  redis.call('HSET', G .. ':s', 'seen', '1')
end

-- Step 2: expire what is old before reading anything, so the decision sees only live
-- usage: window entries always (the window is exact to the millisecond); abandoned
-- reservations, tombstones and global shares when their dates say some are due.
local freed, oldest = window_front(B, now)
if due_housekeeping(B, now, ttl, state,
    function(rid, est, d, m) unreserve(B, rid, est, d, m, now) end) then
  state.wsum = num(redis.call('HGET', B .. ':s', 'wsum'))  -- unreserve may have moved it
end
if use_global then share_housekeeping(G, now, ttl) end
for _, p in ipairs(payers) do payer_housekeeping(p, now, ttl) end
local used_min = state.wsum - freed
local window_reset = WINDOW
if oldest then window_reset = oldest + WINDOW - now end

-- Step 3: read every counter the decision depends on; the periods of the user and
-- of every payer in one MGET.
local requests = redis.call('ZCARD', B .. ':w')
local inflight = redis.call('ZCARD', B .. ':p')
local periods
if #payers == 0 then
  periods = redis.call('MGET', B .. ':d:' .. day, B .. ':m:' .. month)
else
  local period_keys = {B .. ':d:' .. day, B .. ':m:' .. month}
  for _, p in ipairs(payers) do  -- kept for step 6 (payer_take)
    p.dkey, p.mkey = p.base .. ':d:' .. day, p.base .. ':m:' .. month
    period_keys[#period_keys + 1] = p.dkey
    period_keys[#period_keys + 1] = p.mkey
  end
  periods = redis.call('MGET', unpack(period_keys))
end
local used_day, used_month = num(periods[1]), num(periods[2])
local g_day, g_month = 0, 0
if use_global then g_day, g_month = share_used(G, day, month) end
local cut = nil
if #payers > 1 then cut = tostring(now - WINDOW) end  -- formatted once for all of them
for i, p in ipairs(payers) do
  p.day, p.month = num(periods[2 * i + 1]), num(periods[2 * i + 2])
  payer_read(p, now, cut)
end

-- Step 3c (burn.lua): a 'slow' tier past its soft limit shrinks the rates it checks
-- (and reports in the headers) as the month's budget runs out.
rpm, tpm = slowed_rates(rpm, tpm, used_month, tpmo, tonumber(ARGV[26] or -1))

-- What changed in B:s is written in one HSET, whatever the decision; so is what
-- changed in each payer's P:s.
local function save_state(wsum)
  for _, p in ipairs(payers) do payer_save(p, now) end
  local fields = {}
  if wsum ~= state.wsum then fields[#fields + 1] = 'wsum'; fields[#fields + 1] = wsum end
  for name, value in pairs(state.changed or {}) do
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  if #fields > 0 then redis.call('HSET', B .. ':s', unpack(fields)) end
end

-- The token limit the headers describe: the one with the least left once `taken` more
-- is reserved (ties go to the shorter period). Returns limit, left, reset, window (ms);
-- limit -1 when the tier sets no token limit.
-- (Compared one by one, without a table per candidate: a table costs a script more
-- than the comparison.)
local function tokens_header(taken)
  local b_limit, b_left, b_reset, b_window = -1, -1, window_reset, WINDOW
  local function consider(limit, used, reset, window)
    local left = limit - used - taken
    if limit >= 0 and (b_limit < 0 or left < b_left) then
      b_limit, b_left, b_reset, b_window = limit, left, reset, window
    end
  end
  consider(tpm, used_min, window_reset, WINDOW)
  consider(tpd, used_day, day_end - now, day_end - day_start)
  consider(tpmo, used_month, month_end - now, month_end - month_start)
  for _, p in ipairs(payers) do
    consider(p.tpd, p.day, day_end - now, day_end - day_start)
    consider(p.tpmo, p.month, month_end - now, month_end - month_start)
  end
  return b_limit, math.max(b_left, -1), b_reset, b_window
end

-- The request limit the headers describe: the user's or a payer's, whichever has less
-- left once `taken` more requests are counted. Returns limit (-1: none), left, reset.
local function requests_header(taken)
  local limit, left, reset = -1, -1, window_reset
  if rpm >= 0 then limit, left = rpm, rpm - requests - taken end
  for _, p in ipairs(payers) do
    if p.rpm >= 0 and (limit < 0 or p.rpm - p.requests - taken < left) then
      limit, left, reset = p.rpm, p.rpm - p.requests - taken, payer_reset(p, now)
    end
  end
  return limit, math.max(left, 0), reset
end

-- Step 3b: this id is reserved already (the same call, sent again): answer as admitted
-- from its record, with the output cap its amount bought; nothing is taken twice.
-- (Step 2 may just have expired it: then it is finished, as in step 1.)
if prior then
  save_state(used_min)
  local held_state, held, held_day, held_month, held_end =
    parse_record(redis.call('HGET', B .. ':rr', rid) or prior)
  if held_state ~= 'p' then
    return {3, '', 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end, day_end}
  end
  local again = clamp_output(prompt_micro, out_micro, held, max_out)
  local r_limit, r_left, r_reset = requests_header(0)
  local t_limit, t_left, t_reset, t_window = tokens_header(0)
  return {1, '', 0, again, held, now, held_day, held_month,
          r_limit, r_left, r_reset, t_limit, t_left, t_reset,
          held_end, day_end, '', 0, t_window}
end

-- Step 4: find every limit that refuses (see refusal() for which one is named).
local function block_rates(r)
  if rpm >= 0 and requests + 1 > rpm then
    -- A request fits once `requests - rpm + 1` entries have left the window: the wait
    -- runs until the (requests - rpm + 1)-th oldest expires. That is the oldest one
    -- unless the rpm was lowered below what the window already holds.
    local wait = window_reset
    local nth = requests - rpm  -- 0-based rank of that entry
    if nth > 0 then
      local entry = redis.call('ZRANGE', B .. ':w', nth, nth, 'WITHSCORES')
      if #entry > 0 then wait = tonumber(entry[2]) + WINDOW - now end
    end
    r.block('requests_per_minute', wait)
  end
  -- A lease usually ends when its request finishes, long before it expires.
  if conc >= 0 and inflight + 1 > conc then r.block('max_concurrent_requests', 1000) end
  -- Each payer's own request window and calls in flight, beside the user's.
  for _, p in ipairs(payers) do payer_block_rates(p, r, now) end
end
local r = refusal()
block_rates(r)

-- Seconds until the sliding window has let go of `short` tokens.
local function window_wait(short)
  local entries = redis.call('ZRANGE', B .. ':w', 0, -1, 'WITHSCORES')
  if #entries == 0 then return WINDOW end
  local rids = {}
  for i = 1, #entries, 2 do rids[#rids + 1] = entries[i] end
  local recs = {}
  for start = 1, #rids, BATCH do  -- unpack() has a stack limit
    local part = redis.call('HMGET', B .. ':rr', unpack(rids, start, math.min(start + BATCH - 1, #rids)))
    for j = 1, #part do recs[#recs + 1] = part[j] end
  end
  local freed = 0
  for i = 1, #rids do
    freed = freed + window_amount(recs[i])
    if freed >= short then return tonumber(entries[2 * i]) + WINDOW - now end
  end
  return WINDOW
end

-- Step 5: price the request at its full output cap and fit it into the token limits,
-- clamping the output cap to what fits where allowed; the upstream is sent that cap.
local token_limits = {
  {'tokens_per_minute', tpm, used_min, 0},
  {'tokens_per_day', tpd, used_day, day_end},
  {'tokens_per_month', tpmo, used_month, month_end},
  {'global_tokens_per_day', gtpd, g_day, day_end},
  {'global_tokens_per_month', gtpmo, g_month, month_end},
}
for _, p in ipairs(payers) do payer_token_limits(p, token_limits, day_end, month_end) end
local function token_wait(l, short)
  if l[4] == 0 then return window_wait(short) end
  return l[4] - now
end
local granted, est = fit_tokens(token_limits, prompt_micro, out_micro, max_out, min_out, clamp, r,
  token_wait)

-- Step 5b (burn.lua): a paused caller is refused; a minute's spend far above the
-- caller's own baseline pauses it now. The minute before this call: one call, however
-- large (a huge prompt reserved on its byte bound), is not a rate.
local tripped = burn_check(B, now, used_min, tonumber(ARGV[23] or -1),
  tonumber(ARGV[24] or -1), tonumber(ARGV[25] or -1), r)
-- So is a paused key or team, or one whose minute (payer_minute: settled spend) runs
-- far above its own baseline; the refusal names it ('key.burn_rate_exceeded').
for _, p in ipairs(payers) do
  if payer_burn_check(p, now, r) == 1 then tripped = 1 end
end

if r.name then
  save_state(used_min)
  local r_limit, r_left, r_reset = requests_header(0)
  -- The probe: the same checks for the lower bound, nothing written.
  local probe = refusal()
  if ARGV[21] and ARGV[21] ~= '' then
    block_rates(probe)
    fit_tokens(token_limits, tonumber(ARGV[21]), out_micro, max_out, min_out, ARGV[22] == '1',
      probe, token_wait)
  end
  local t_limit, t_left, t_reset, t_window = tokens_header(0)
  return {0, r.name, r.wait, 0, est, now, day, month,
          r_limit, r_left, r_reset, t_limit, t_left, t_reset,
          month_end, day_end, probe.name or '', math.max(probe.wait, 0), t_window, tripped}
end

-- Step 6: reserve in every window and period at once, for every payer. The record remembers where
-- the estimate went, so settle and expiry can take back exactly that.
-- The shares' figures are formatted once for all of them, and the user's commands
-- send the same strings (a number passed to redis.call is formatted anew each time).
local t = nil
if use_global or #payers > 0 then
  t = taking(rid, est, day, day_end, month, month_end, now, ttl, month_end_s)
end
if t then
  redis.call('ZADD', B .. ':w', t.now_s, rid)
  redis.call('ZADD', B .. ':p', t.lease_s, rid)
else
  redis.call('ZADD', B .. ':w', now, rid)
  redis.call('ZADD', B .. ':p', now + ttl, rid)
end
lease_due(state, now, ttl)
for _, p in ipairs(payers) do payer_take(p, t, now, ttl, inflight == 0) end
save_state(used_min + est)
add_period(B .. ':d:' .. day, est, day_end + DAY_GRACE, t and t.est_s)
add_period(B .. ':m:' .. month, est, month_end + MONTH_GRACE, t and t.est_s)
local g = '0'
if use_global then
  share_take(G, t, now)
  g = '1'
end
redis.call('HSET', B .. ':rr', rid, record('p', est, day, month, month_end, g, model))
if tonumber(s[2]) ~= math.floor(now / 86400000) then touch(B, now) end

if not oldest then window_reset = WINDOW end
for _, p in ipairs(payers) do
  if p.requests == 0 then p.reset = WINDOW end
end
local r_limit, r_left, r_reset = requests_header(1)
local t_limit, t_left, t_reset, t_window = tokens_header(est)
return {1, '', 0, granted, est, now, day, month,
        r_limit, r_left, r_reset, t_limit, t_left, t_reset,
        month_end, day_end, '', 0, t_window}
