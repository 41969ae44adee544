-- amend: lower a pending reservation's estimate, or withdraw it as if never admitted.
-- On a cluster the global caps are checked after the user's reserve; when they clamp
-- the output further this lowers the user's share to match, and when they refuse it
-- takes the first step back.
-- KEYS[1] user base B; then the bases of the payers whose shares the user's script
-- took with it (an API key's K, in B's slot).
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 new estimate (0 = withdraw).
-- Returns 1 if amended, 0 if the reservation was no longer pending.

local B = KEYS[1]
local now = now_ms(ARGV[1])
local rid, ttl, amount = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])

-- Step 1: only a pending reservation can be amended.
local rec = redis.call('HGET', B .. ':rr', rid)
if not rec then return 0 end
local state, est, day, month, month_end, g, model = parse_record(rec)
if state ~= 'p' then return 0 end

if amount <= 0 then
  -- Step 2a: withdraw: every counter, the lease, and the request window too, since a
  -- refused request is not counted as made.
  unreserve(B, rid, est, day, month, now)
  redis.call('ZREM', B .. ':w', rid)
  redis.call('HSET', B .. ':rr', rid, record('l', 0, day, month, month_end, g, model))
  redis.call('ZADD', B .. ':z', now + ttl, rid)
  for i = 2, #KEYS do
    share_amend(KEYS[i], rid, 0, now, ttl)
    redis.call('ZREM', KEYS[i] .. ':w', rid)
  end
  return 1
end

-- Step 2b: lower the estimate in the periods, the token window and the record.
local diff = est - amount
if diff <= 0 then return 1 end
adjust(B .. ':d:' .. day, -diff, now)
adjust(B .. ':m:' .. month, -diff, now)
adjust_window(B, rid, est, amount)
redis.call('HSET', B .. ':rr', rid, record('p', amount, day, month, month_end, g, model))
-- Step 3: the payers' shares follow the user's.
for i = 2, #KEYS do share_amend(KEYS[i], rid, amount, now, ttl) end
return 1
