-- Burn-rate breaker. Time is in milliseconds, amounts in base tokens, as in common.lua.
-- The ledger prepends this file (after common.lua) to every script. Every function
-- takes a payer's base P: a user's B, whose minute spend is the sliding window "wsum"
-- in B:s, or an API key's K or a team's T, whose minute spend payer_minute() keeps.
--
-- Fields in P:s (the payer's state hash, so no new key and no new expiry):
--   bb  the 5-minute bucket being watched (now // BURN_BUCKET)
--   bx  the highest one-minute spend ("wsum" after a settle) seen in bucket bb
--   bp  the baseline: the busiest minute of the closed buckets, decaying with a
--       half-life of BURN_HALF_LIFE buckets (3.5 days), as an integer
--   bz  > now: paused until then; < 0: staff resumed, no trip before -bz
--   mm, mc, mp (a key's or a team's only): the minute (now // WINDOW) being counted,
--       its settled spend, and the spend of the minute before it
-- Why a decaying peak of minutes and not a mean: a week's mean includes nights and
-- weekends, so a person's ordinary busy minute is 10-20 times it; the trip compares
-- one minute with one minute. Only closed buckets teach the baseline, so a runaway
-- cannot raise its own bar before it trips (and the bucket it tripped in is dropped).

local BURN_BUCKET = 300000         -- 5 minutes
local BURN_HALF_LIFE = 1008        -- buckets in 3.5 days: a weekend halves nothing away
local BURN_GROWTH = 2              -- a closed bucket may at most double the baseline...
local BURN_SEED = 1000             -- ...or raise it to this (base tokens a minute)
local BURN_LN2 = math.log(2)

-- The baseline `bp` carried from bucket `bb` to bucket `bucket`: a gap of g buckets
-- decays it by 2^(-g / half-life).
local function burn_decayed(bp, bb, bucket)
  if bb >= bucket then return bp end
  return bp * math.exp(-BURN_LN2 * (bucket - bb) / BURN_HALF_LIFE)
end

-- The baseline at `bucket`, from the fields bb, bx, bp: a bucket before `bucket` is
-- closed, so its busiest minute counts even before a settle has folded it in. It may
-- raise the baseline to at most twice what it was (or BURN_SEED): a runaway whose
-- bucket closes before it trips must not teach itself a bar ten times its own pace.
-- A person's busier weeks still get in: the cap doubles with every busy bucket.
local function burn_baseline(bb, bx, bp, bucket)
  if bb == nil then return 0 end
  local base = burn_decayed(bp, bb, bucket)
  if bb < bucket then
    base = math.max(base, math.min(bx, BURN_GROWTH * math.max(base, BURN_SEED)))
  end
  return base
end

-- A key's or a team's minute spend. Payers keep no per-request amounts in their
-- window, so the spend is counted in whole minutes: the current one (mc) and the one
-- before (mp), the latter weighted by how much of it still lies in the last 60 s. Three
-- fields, no new key; exact enough to compare a minute with a ten-times-busier one.
-- `add`: base tokens settled now (0 to only read). `pre`: the three fields where the
-- caller has read them already (payer_state). Returns the minute's spend.
local function payer_minute(P, now, add, pre)
  local f = pre or redis.call('HMGET', P .. ':s', 'mm', 'mc', 'mp')
  local mm, mc, mp = tonumber(f[1]), num(f[2]), num(f[3])
  local m = math.floor(now / WINDOW)
  if mm == nil or m > mm then
    -- A new minute: the one before is the last counted one only if it was m - 1.
    if mm == m - 1 then mp = mc else mp = 0 end
    mc = 0
  elseif m < mm then
    m = mm  -- a settle stamped before the last one (the caller's clock): count it now
  end
  local spend = mc + add + math.floor(mp * (1 - (now % WINDOW) / WINDOW))
  if add ~= 0 then
    redis.call('HSET', P .. ':s', 'mm', m, 'mc', mc + add, 'mp', mp)
    -- A key's state has no other refresh: it lives a STRUCT_TTL past its last settle.
    if mm ~= m then redis.call('PEXPIREAT', P .. ':s', now + STRUCT_TTL) end
  end
  return spend
end

-- Settle's step: fold the one-minute spend (the window's "wsum" after this settle:
-- settled amounts, and estimates still pending) into the bucket's busiest minute;
-- when a new bucket starts, the old one's busiest minute joins the baseline first.
-- One HMGET, and one HSET only when something moved. `minute`: the payer's minute
-- spend where the caller knows it (payer_minute), else B:s "wsum" (a user's).
local function burn_settled(P, now, minute)
  local f = redis.call('HMGET', P .. ':s', 'bb', 'bx', 'bp', 'wsum')
  local bucket = math.floor(now / BURN_BUCKET)
  local bb, bx, bp = tonumber(f[1]), num(f[2]), num(f[3])
  minute = minute or num(f[4])
  if bb == nil or bucket > bb then
    -- Step 1: close bucket bb: the baseline is the larger of the decayed baseline and
    -- that bucket's busiest minute.
    bp = burn_baseline(bb, bx, bp, bucket)
    redis.call('HSET', P .. ':s', 'bb', bucket, 'bx', math.max(minute, 0), 'bp', math.floor(bp))
  elseif minute > bx then
    -- Step 2: same bucket, a busier minute than any so far.
    redis.call('HSET', P .. ':s', 'bx', minute)
  end
end

-- Reserve's step, given the refusal `r` of the other limits and the one-minute spend
-- before this request (`minute`). mult and floor: -1 = off; pause_ms: -1 = off.
-- `label` prefixes the refusal's name with the payer's ('key.', 'team.'; '' a user's).
-- `pre`: P:s's bz, bb, bp, bx where the caller has read them already (payer_state).
-- Returns 1 if this reserve tripped the breaker, else 0.
local function burn_check(P, now, minute, mult, floor, pause_ms, r, label, pre)
  label = label or ''
  if mult < 0 or floor < 0 or pause_ms < 0 then return 0 end
  local f = pre or redis.call('HMGET', P .. ':s', 'bz', 'bb', 'bp', 'bx')
  local bz = num(f[1])
  -- Step 1: paused: refused until the pause ends, whatever the rate is now.
  if bz > now then
    r.block(label .. 'burn_rate_exceeded', bz - now)
    return 0
  end
  -- Step 2: nothing to decide when another limit refuses (nothing is spent), or just
  -- after a staff resume (the window still holds the spend that tripped it).
  if r.name or -bz > now then return 0 end
  -- Step 3: trip when the minute exceeds both the floor and mult x the baseline.
  local bucket = math.floor(now / BURN_BUCKET)
  local baseline = burn_baseline(tonumber(f[2]), num(f[4]), num(f[3]), bucket)
  if minute <= floor or minute <= mult * baseline then return 0 end
  -- Step 4: pause. The current bucket's busiest minute is forgotten: a runaway's
  -- spend must not become the baseline once the bucket closes.
  redis.call('HSET', P .. ':s', 'bz', now + pause_ms, 'bb', bucket, 'bx', 0,
    'bp', math.floor(baseline))
  r.block(label .. 'burn_rate_exceeded', pause_ms)
  return 1
end

-- A key's or a team's breaker at reserve: `p` from parse_payers, its state hash read
-- by payer_state; its minute is its settled spend (payer_minute). Returns 1 if this
-- reserve tripped it.
local function payer_burn_check(p, now, r)
  if p.mult < 0 or p.floor < 0 or p.pause < 0 then return 0 end
  local s = p.state
  local minute = payer_minute(p.base, now, 0, {s.mm, s.mc, s.mp})
  return burn_check(p.base, now, minute, p.mult, p.floor, p.pause, r, p.label,
    {s.bz, s.bb, s.bp, s.bx})
end

-- Staff resume: the pause ends now, and the trip waits one window, until the spend
-- that tripped it has left the minute. Returns 1 if the payer was paused.
local function burn_resume(P, now)
  local bz = num(redis.call('HGET', P .. ':s', 'bz'))
  redis.call('HSET', P .. ':s', 'bz', -(now + WINDOW))
  -- A key never settled has no state hash yet: the resume must not leave one forever.
  if redis.call('PTTL', P .. ':s') == -1 then redis.call('PEXPIRE', P .. ':s', STRUCT_TTL) end
  if bz > now then return 1 end
  return 0
end

-- The breaker's state for reports: paused until (ms, 0 if not), the baseline per
-- minute now, and the one-minute spend (a user's wsum as last kept; a key's or a
-- team's from payer_minute()).
local function burn_state(P, now)
  local f = redis.call('HMGET', P .. ':s', 'bz', 'bb', 'bp', 'bx', 'wsum', 'mm')
  local bz = num(f[1])
  if bz <= now then bz = 0 end
  local base = burn_baseline(tonumber(f[2]), num(f[4]), num(f[3]), math.floor(now / BURN_BUCKET))
  local minute = num(f[5])
  if f[6] then minute = payer_minute(P, now, 0) end
  return {bz, math.floor(base), minute}
end

-- Adaptive slow-down, a tier's choice (soft_limit_mode 'slow'). Past the soft limit of
-- the month's budget, the request and token rates shrink in proportion to what is left
-- of the budget beyond that limit: at the soft limit they are whole, at the budget's
-- end they are 1. A loop crawls long before the hard stop, and a person far below the
-- rates notices little. soft: the soft limit in percent, -1 = off (the tier alerts).
-- Returns the rates to apply (-1 stays unlimited).
local function slowed_rates(rpm, tpm, used_month, tpmo, soft)
  if soft < 0 or tpmo < 0 then return rpm, tpm end
  -- Step 1: below the soft limit (rounded up, as the alert rounds it) nothing changes.
  local threshold = math.ceil(tpmo * soft / 100)
  if used_month < threshold then return rpm, tpm end
  -- Step 2: the share of the budget past the soft limit still left, 0 to 1.
  local share = 0
  if tpmo > threshold then share = math.max(tpmo - used_month, 0) / (tpmo - threshold) end
  -- Step 3: each limit the tier sets shrinks by that share, never below 1.
  local function shrink(rate)
    if rate < 0 then return rate end
    return math.max(1, math.floor(rate * share))
  end
  return shrink(rpm), shrink(tpm)
end
