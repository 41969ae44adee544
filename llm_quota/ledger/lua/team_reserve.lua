-- team_reserve: a cluster's second step for a payer in its own slot (a team), run after
-- reserve.lua admitted the request in the user's slot; a refusal here makes the caller
-- withdraw that first step (amend.lua), as global_reserve.lua's does.
-- KEYS[1] the payer's base P.
-- ARGV: 1 now (the first step's, so both leases end together), 2 reservation id,
--       3 ttl, 4 label ('team.'), 5 requests/min, 6 concurrent, 7 tokens/day,
--       8 tokens/month (-1 = unlimited), 9 prompt cost in micro base tokens,
--       10 micro base tokens per output token, 11 output tokens the first step granted,
--       12 least output worth clamping to, 13 clamp (1/0), 14 day, 15 day end,
--       16 month, 17 month end, 18 burn multiplier, 19 floor, 20 pause (ms; -1 = the
--       team's breaker is off; burn.lua).
-- Returns {status, limit, retry_ms, granted_output, reserved, tokens_limit, tokens_left,
-- tokens_reset_ms, period ('d' or 'm'), requests_limit, requests_left, requests_reset_ms,
-- burn_tripped (on a refusal: 1 if this step paused the team)}:
-- status 1 admitted (perhaps clamped lower than the first step), 0 refused, 2 restore the
-- team's counters first, 3 this id is finished here already (released before this step
-- arrived: its reply was lost, see reserve.lua). The tokens_* and requests_* fields describe the payer's tightest limits
-- (-1: none), which the caller compares with the user's for the rate-limit headers.

local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])
local p = {label = ARGV[4], base = KEYS[1], rpm = tonumber(ARGV[5]), conc = tonumber(ARGV[6]),
           tpd = tonumber(ARGV[7]), tpmo = tonumber(ARGV[8]), mult = tonumber(ARGV[18] or -1),
           floor = tonumber(ARGV[19] or -1), pause = tonumber(ARGV[20] or -1),
           win = KEYS[1] .. ':w'}
local prompt_micro, out_micro = tonumber(ARGV[9]), tonumber(ARGV[10])
local max_out, min_out, clamp = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13] == '1'
local day, day_end = ARGV[14], tonumber(ARGV[15])
local month, month_end = ARGV[16], tonumber(ARGV[17])

-- Step 1: an id P holds already is never taken twice: a pending share is answered as
-- admitted again (the same step, sent again), a finished one or a tombstone refuses.
local prior = redis.call('HGET', p.base .. ':rr', rid)
if prior then
  local state, held = parse_record(prior)
  if state ~= 'p' then return {3, '', 0, 0, 0} end
  return {1, '', 0, clamp_output(prompt_micro, out_micro, held, max_out), held}
end

-- Step 1b: counters lost with Redis' data are restored first (team_restore.lua); the
-- caller restores once and sends this step again.
payer_state(p)
if not payer_trusted(p, now) then return {2, '', 0, 0, 0} end

-- Step 2: expired shares give their tokens back (when due); read the payer's counters.
payer_housekeeping(p, now, ttl)
payer_read(p, now)
p.day, p.month = share_used(p.base, day, month)

-- Step 3: its request window, calls in flight and token budgets, as reserve.lua would.
local r = refusal()
payer_block_rates(p, r, now)
local limits = {}
payer_token_limits(p, limits, day_end, month_end)
local granted, est = fit_tokens(limits, prompt_micro, out_micro, max_out, min_out, clamp, r,
  function(l) return l[4] - now end)
-- Step 3b (burn.lua): the team's breaker, as reserve.lua checks it on one Redis.
local tripped = payer_burn_check(p, now, r)
-- The payer's figures for the headers, once `taken` tokens and `counted` requests more
-- are held.
local function headers(taken, counted)
  local t = {-1, -1, 0, ''}
  for _, c in ipairs({{p.tpd, p.day, day_end, 'd'}, {p.tpmo, p.month, month_end, 'm'}}) do
    local left = c[1] - c[2] - taken
    if c[1] >= 0 and (t[1] < 0 or left < t[2]) then t = {c[1], left, c[3] - now, c[4]} end
  end
  local q = {-1, -1, WINDOW}
  if p.rpm >= 0 then
    q = {p.rpm, math.max(p.rpm - p.requests - counted, 0), payer_reset(p, now)}
  end
  return t, q
end

if r.name then
  payer_save(p, now)
  local t, q = headers(0, 0)
  return {0, r.name, r.wait, 0, est, t[1], math.max(t[2], 0), t[3], t[4], q[1], q[2], q[3],
          tripped}
end

-- Step 4: take the share under its own lease, and count the request.
payer_take(p, taking(rid, est, day, day_end, month, month_end, now, ttl), now, ttl)
payer_save(p, now)
if p.requests == 0 then p.reset = WINDOW end
local t, q = headers(est, 1)
return {1, '', 0, granted, est, t[1], math.max(t[2], 0), t[3], t[4], q[1], q[2], q[3]}
