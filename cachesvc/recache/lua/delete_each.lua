-- Delete keys one by one, saying which existed.
-- KEYS     the keys to delete
-- ARGV     none
-- Returns one 0/1 per key.
local out = {}
for i = 1, #KEYS do out[i] = redis.call('DEL', KEYS[i]) end
return out
