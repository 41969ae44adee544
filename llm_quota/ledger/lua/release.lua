-- release: give a reservation back whole, for an upstream call that failed.
-- KEYS[1] user base B, then one base per payer (ARGV[4] of them), then the global
-- base G, on one Redis only (a cluster releases G in global_release.lua).
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 how many payers.
-- Returns 1 if released, 0 if it was no longer pending (idempotent) or never seen.
-- The request itself stays counted in the request window: it was made.
-- Also the release of a reserve whose reply was lost: Redis may have run it, may run
-- it later (it was still in a frozen server's socket), or never.

local B = KEYS[1]
local npayers = tonumber(ARGV[4] or '0')
local G = KEYS[2 + npayers]
local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])

-- Step 1: only a pending reservation holds anything to give back. An id not seen yet
-- is tombstoned, so its reserve, should it arrive after this, reserves nothing.
local rec = redis.call('HGET', B .. ':rr', rid)
if not rec then
  tombstone(B, rid, now, ttl)
  -- Its payers' shares are tombstoned too: their part of the reserve may arrive later.
  for i = 1, npayers do share_release(KEYS[1 + i], rid, now, ttl) end
  return 0
end
local state, est, day, month, month_end, g, model = parse_record(rec)
if state ~= 'p' then return 0 end

-- Step 2: take the estimate out of every counter, the window and the leases.
unreserve(B, rid, est, day, month, now)
if G ~= nil and g == '1' then share_release(G, rid, now, ttl) end
for i = 1, npayers do share_release(KEYS[1 + i], rid, now, ttl) end

-- Step 3: tombstone, so a settle that races the release cannot charge it again.
redis.call('HSET', B .. ':rr', rid, record('l', 0, day, month, month_end, g, model))
redis.call('ZADD', B .. ':z', now + ttl, rid)
return 1
