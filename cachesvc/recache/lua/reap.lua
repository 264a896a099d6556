-- Return entries whose lease expired (their daemon died or hung) to their queues, as they were.
-- KEYS[1..3]  cachesvc:inflight, cachesvc:inflight:started, cachesvc:inflight:meta
-- ARGV[1]     most entries to return in this call
-- Each entry's queue key is the first line of its id (queue key .. "\n" .. member).
-- Returns the number of entries returned.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local inflight, started, meta_key = KEYS[1], KEYS[2], KEYS[3]
local ids = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local meta = redis.call('HGET', meta_key, id)
  local nl = string.find(id, '\n', 1, true)
  if meta and nl then
    local score = string.match(meta, '^([^|]*)|')
    redis.call('ZADD', string.sub(id, 1, nl - 1), 'LT', score, string.sub(id, nl + 1))
  end
  redis.call('ZREM', inflight, id)
  redis.call('ZREM', started, id)
  redis.call('HDEL', meta_key, id)
end
return #ids
