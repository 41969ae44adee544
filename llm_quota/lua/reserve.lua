-- reserve: check every limit and reserve the estimate in all of them, or in none.
-- KEYS[1] user base B, KEYS[2] global base G.
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl,
--       4 requests/min, 5 concurrent, 6 tokens/min, 7 tokens/day, 8 tokens/month,
--       9 global tokens/day, 10 global tokens/month   (-1 = unlimited),
--       11 prompt cost in micro base tokens, 12 micro base tokens per output token,
--       13 requested output tokens, 14 least output worth clamping to, 15 clamp (1/0),
--       16 model, 17 day ids, 18 day starts, 19 month ids, 20 month starts.
-- Returns {status, limit, retry_ms, granted_output, reserved, now, day, month,
--          requests_limit, requests_remaining, requests_reset_ms,
--          tokens_limit, tokens_remaining, tokens_reset_ms, month_end}
-- status: 1 admitted, 0 refused (limit names the binding one), 2 restore counters first.

local B, G = KEYS[1], KEYS[2]
local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])
local rpm, conc, tpm = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tpd, tpmo = tonumber(ARGV[7]), tonumber(ARGV[8])
local gtpd, gtpmo = tonumber(ARGV[9]), tonumber(ARGV[10])
local prompt_micro, out_micro = tonumber(ARGV[11]), tonumber(ARGV[12])
local max_out, min_out, clamp = tonumber(ARGV[13]), tonumber(ARGV[14]), ARGV[15] == '1'
local model = ARGV[16]
local day, day_end = pick_period(ARGV[17], ARGV[18], now)
local month, month_end = pick_period(ARGV[19], ARGV[20], now)
local use_global = gtpd >= 0 or gtpmo >= 0

-- Step 1: expire what is old (window entries, abandoned reservations, tombstones)
-- before reading anything, so the decision sees only live usage.
housekeeping(B, G, now, ttl)

-- Step 2: counters lost with Redis' data must be restored from the database before
-- they are trusted; the caller restores once and asks again.
if redis.call('HEXISTS', B .. ':s', 'seen') == 0 then
  return {2, '', 0, 0, 0, now, day, month, 0, 0, 0, 0, 0, 0, month_end}
end

-- Step 3: read every counter the decision depends on.
local requests = redis.call('ZCARD', B .. ':w')
local inflight = redis.call('ZCARD', B .. ':p')
local used_min = num(redis.call('HGET', B .. ':wt', '_sum'))
local used_day = num(redis.call('GET', B .. ':d:' .. day))
local used_month = num(redis.call('GET', B .. ':m:' .. month))
local g_day, g_month = 0, 0
if use_global then
  g_day = num(redis.call('GET', G .. ':d:' .. day))
  g_month = num(redis.call('GET', G .. ':m:' .. month))
end
local oldest = redis.call('ZRANGE', B .. ':w', 0, 0, 'WITHSCORES')
local window_reset = WINDOW
if #oldest > 0 then window_reset = tonumber(oldest[2]) + WINDOW - now end

-- Step 4: price the request at its full output cap, and at the least worth sending.
local est_full = ceil_div(prompt_micro + max_out * out_micro, 1000000)
local est_min = ceil_div(prompt_micro + math.min(min_out, max_out) * out_micro, 1000000)

-- Step 5: find every limit that refuses. The one that takes longest to clear names
-- the refusal, because a retry before then would be refused again.
local blocking, retry = nil, -1
local function block(name, wait)
  if wait < 1 then wait = 1 end
  if wait > retry then blocking, retry = name, wait end
end

if rpm >= 0 and requests + 1 > rpm then block('requests_per_minute', window_reset) end
-- A lease usually ends when its request finishes, long before it expires.
if conc >= 0 and inflight + 1 > conc then block('max_concurrent_requests', 1000) end

local token_limits = {
  {'tokens_per_minute', tpm, used_min, 0},
  {'tokens_per_day', tpd, used_day, day_end},
  {'tokens_per_month', tpmo, used_month, month_end},
  {'global_tokens_per_day', gtpd, g_day, day_end},
  {'global_tokens_per_month', gtpmo, g_month, month_end},
}
local headroom = nil
for _, l in ipairs(token_limits) do
  if l[2] >= 0 and (headroom == nil or l[2] - l[3] < headroom) then headroom = l[2] - l[3] end
end

-- Seconds until the sliding window has let go of `short` tokens.
local function window_wait(short)
  local entries = redis.call('ZRANGE', B .. ':w', 0, -1, 'WITHSCORES')
  local freed = 0
  for i = 1, #entries, 2 do
    freed = freed + num(redis.call('HGET', B .. ':wt', entries[i]))
    if freed >= short then return tonumber(entries[i + 1]) + WINDOW - now end
  end
  return WINDOW
end

local granted, est = max_out, est_full
if headroom ~= nil and est_full > headroom then
  if clamp and est_min <= headroom then
    -- Step 6: clamp the output cap to what fits; the upstream is sent this cap.
    if out_micro > 0 then
      granted = math.floor((headroom * 1000000 - prompt_micro) / out_micro)
      while granted > 0 and ceil_div(prompt_micro + granted * out_micro, 1000000) > headroom do
        granted = granted - 1
      end
      if granted > max_out then granted = max_out end
    end
    est = ceil_div(prompt_micro + granted * out_micro, 1000000)
  else
    local need = est_full
    if clamp then need = est_min end
    for _, l in ipairs(token_limits) do
      if l[2] >= 0 and l[2] - l[3] < need then
        if l[4] == 0 then
          block(l[1], window_wait(need - (l[2] - l[3])))
        else
          block(l[1], l[4] - now)
        end
      end
    end
  end
end

local tokens_limit, tokens_left = tpm, tpm - used_min
if tpm < 0 then tokens_limit, tokens_left = -1, -1 end

if blocking then
  local left = -1
  if rpm >= 0 then left = math.max(rpm - requests, 0) end
  return {0, blocking, retry, 0, est_full, now, day, month,
          rpm, left, window_reset, tokens_limit, math.max(tokens_left, -1), window_reset, month_end}
end

-- Step 7: reserve in every window and period at once. The record remembers where
-- the estimate went, so settle and expiry can take back exactly that.
redis.call('ZADD', B .. ':w', now, rid)
redis.call('HSET', B .. ':wt', rid, est)
redis.call('HINCRBY', B .. ':wt', '_sum', est)
redis.call('ZADD', B .. ':p', now + ttl, rid)
add_period(B .. ':d:' .. day, est, day_end + DAY_GRACE)
add_period(B .. ':m:' .. month, est, month_end + MONTH_GRACE)
local g = '0'
if use_global then
  add_period(G .. ':d:' .. day, est, day_end + DAY_GRACE)
  add_period(G .. ':m:' .. month, est, month_end + MONTH_GRACE)
  g = '1'
end
redis.call('HINCRBY', B .. ':s', 'reserved', est)
redis.call('HSET', B .. ':rr', rid, record('p', est, day, month, month_end, g, model))
touch(B, now)

local requests_left = -1
if rpm >= 0 then requests_left = rpm - requests - 1 end
if tpm >= 0 then tokens_left = tpm - used_min - est end
if #oldest == 0 then window_reset = WINDOW end
return {1, '', 0, granted, est, now, day, month,
        rpm, requests_left, window_reset, tokens_limit, tokens_left, window_reset, month_end}
