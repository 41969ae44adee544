-- global_reserve: a cluster's second step, the global caps, in the global slot G.
-- Runs after reserve.lua admitted the request in the user's slot; a refusal here
-- makes the caller withdraw that first step (amend.lua).
-- KEYS[1] global base G.
-- ARGV: 1 now (the first step's, so both leases end together), 2 reservation id,
--       3 ttl, 4 global tokens/day, 5 global tokens/month (-1 = unlimited),
--       6 prompt cost in micro base tokens, 7 micro base tokens per output token,
--       8 output tokens the first step granted, 9 least output worth clamping to,
--       10 clamp (1/0), 11 day, 12 day end, 13 month, 14 month end.
-- Returns {status, limit, retry_ms, granted_output, reserved}: status 1 admitted
-- (perhaps clamped lower than the first step), 0 refused, 3 this id is finished here
-- already (released before this step arrived: its reply was lost, see reserve.lua).

local G = KEYS[1]
local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])
local gtpd, gtpmo = tonumber(ARGV[4]), tonumber(ARGV[5])
local prompt_micro, out_micro = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_out, min_out, clamp = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10] == '1'
local day, day_end = ARGV[11], tonumber(ARGV[12])
local month, month_end = ARGV[13], tonumber(ARGV[14])

-- Step 1: shares whose lease ran out give their tokens back, and old tombstones go.
share_housekeeping(G, now, ttl)

-- Step 1b: an id G holds already is never taken twice: a pending share is answered as
-- admitted again (the same step, sent again), a finished one or a tombstone refuses.
local prior = redis.call('HGET', G .. ':rr', rid)
if prior then
  local state, held = parse_record(prior)
  if state ~= 'p' then return {3, '', 0, 0, 0} end
  return {1, '', 0, clamp_output(prompt_micro, out_micro, held, max_out), held}
end

-- Step 2: fit the request into what everyone has left today and this month.
local g_day, g_month = share_used(G, day, month)
local r = refusal()
local granted, est = fit_tokens({
  {'global_tokens_per_day', gtpd, g_day, day_end},
  {'global_tokens_per_month', gtpmo, g_month, month_end},
}, prompt_micro, out_micro, max_out, min_out, clamp, r, function(l) return l[4] - now end)
if r.name then return {0, r.name, r.wait, 0, est} end

-- Step 3: take the share under its own lease.
share_take(G, taking(rid, est, day, day_end, month, month_end, now, ttl), now)
return {1, '', 0, granted, est}
