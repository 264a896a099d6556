-- Return entries whose lease expired (their daemon died or hung) to their queues, as they were.
-- KEYS[1..5]  cachesvc:inflight, cachesvc:inflight:started, cachesvc:inflight:meta, cachesvc:attempts
--             (unused), cachesvc:inflight:ended (as settle.lua keeps it: a returned entry ends its claim)
-- ARGV[1]     most entries to return in this call
-- Each entry's queue key is the first line of its id (queue key .. "\n" .. member).
-- Returns the number of entries returned.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ENDED_KEEP = 10  -- seconds, as in settle.lua
local inflight, started, meta_key, ended = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
redis.call('ZREMRANGEBYSCORE', ended, '-inf', now - ENDED_KEEP)
local ids = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local meta = redis.call('HGET', meta_key, id)
  local nl = string.find(id, '\n', 1, true)
  if meta and nl then
    local score = string.match(meta, '^([^|]*)|')
    redis.call('ZADD', string.sub(id, 1, nl - 1), 'LT', score, string.sub(id, nl + 1))
  end
  local claimed_at = redis.call('ZSCORE', started, id)
  if claimed_at then
    redis.call('ZADD', ended, now, claimed_at .. '|' .. id)
  end
  redis.call('ZREM', inflight, id)
  redis.call('ZREM', started, id)
  redis.call('HDEL', meta_key, id)
end
redis.call('EXPIRE', ended, ENDED_KEEP)  -- no-op when nothing ended
return #ids
