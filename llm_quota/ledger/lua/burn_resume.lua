-- burn_resume: staff end a payer's burn-rate pause (burn.lua).
-- KEYS[1] the payer's base. ARGV: 1 now (0 = Redis' clock).
-- Returns 1 if the payer was paused, else 0 (nothing to end; the grace starts anyway).
return burn_resume(KEYS[1], now_ms(ARGV[1]))
