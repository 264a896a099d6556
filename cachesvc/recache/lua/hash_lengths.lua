-- HLEN of several hashes in one round trip.
-- KEYS     the hashes
-- ARGV     none
-- Returns one length per key.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('HLEN', KEYS[i]) end
return out
