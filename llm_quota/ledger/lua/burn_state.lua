-- burn_state: a payer's breaker, for the admin and the usage reports (burn.lua).
-- KEYS[1] the payer's base. ARGV: 1 now (0 = Redis' clock).
-- Returns {paused_until_ms (0: not paused), baseline per minute, minute's spend, now}.
local now = now_ms(ARGV[1])
local state = burn_state(KEYS[1], now)
state[4] = now
return state
