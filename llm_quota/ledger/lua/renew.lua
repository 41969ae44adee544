-- renew: extend a live call's lease, so a call that outlives the TTL keeps what it
-- reserved (its tokens and its concurrency slot) for as long as it runs.
-- KEYS[1] user base B, then one base per payer (ARGV[4] of them), then the global
-- base G, on one Redis only (a cluster renews G in global_renew.lua).
-- ARGV: 1 now (0 = Redis' clock), 2 reservation id, 3 ttl, 4 how many payers.
-- Returns 1 if renewed, 0 if the reservation was no longer pending: a settled or
-- released one has nothing to keep, and an expired one gave its tokens back already
-- (its settle charges the whole usage, late), so none of them is touched.

local B = KEYS[1]
local npayers = tonumber(ARGV[4] or '0')
local G = KEYS[2 + npayers]
local now = now_ms(ARGV[1])
local rid, ttl = ARGV[2], tonumber(ARGV[3])

-- Step 1: the lease in B:p moves out to a TTL from now, if the reservation is pending.
local g = renew_lease(B, rid, now + ttl)
if not g then return 0 end

-- Step 2: reserve's housekeeping date ("pdue": no lease expires before it) follows the
-- earliest lease, which this one may have been.
local first = redis.call('ZRANGE', B .. ':p', 0, 0, 'WITHSCORES')
if #first > 0 then redis.call('HSET', B .. ':s', 'pdue', tonumber(first[2])) end

-- Step 3: the global share keeps its own lease; move it too where this script reaches G.
if G ~= nil and g == '1' then renew_lease(G, rid, now + ttl) end
-- Step 4: so do the payers' shares this script reaches.
for i = 1, npayers do renew_lease(KEYS[1 + i], rid, now + ttl) end
return 1
