-- Size and due entries of several queues in one round trip.
-- KEYS     the queues (ZSET recache:{host}:{priority})
-- ARGV[1]  now (Unix seconds): entries scored at or before it are due
-- Returns {total, due, total, due, ...}, one pair per key.
local out = {}
for i = 1, #KEYS do
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
  out[#out + 1] = redis.call('ZCOUNT', KEYS[i], '-inf', ARGV[1])
end
return out
