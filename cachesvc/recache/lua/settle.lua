-- End claims: ack (done), retry (back in the queue after a backoff, or dead-lettered once out of
-- attempts), dead (dead-lettered now) or release (back in the queue as it was).
-- KEYS[1..4]  cachesvc:inflight, cachesvc:inflight:started, cachesvc:inflight:meta, cachesvc:attempts
-- KEYS[5 + 2g], KEYS[6 + 2g]  group g's queue and its host's dead-letter set
-- ARGV  six per group g: member, token, action, delay (seconds), max_retries, dead-letter record
--       (JSON with "attempts":0, filled in here)
-- Returns one outcome per group: ack, retry, dead, release, or gone (the claim is no longer ours).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local inflight, started, meta_key, attempts_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local out = {}
for g = 0, #ARGV / 6 - 1 do
  local key, dead_key = KEYS[5 + 2 * g], KEYS[6 + 2 * g]
  local member, token, action = ARGV[g * 6 + 1], ARGV[g * 6 + 2], ARGV[g * 6 + 3]
  local delay, max_retries, record = tonumber(ARGV[g * 6 + 4]), tonumber(ARGV[g * 6 + 5]), ARGV[g * 6 + 6]
  local id = key .. '\n' .. member
  local meta = redis.call('HGET', meta_key, id)
  local result = 'gone'
  if meta and string.sub(meta, -#token) == token then
    local score = string.match(meta, '^([^|]*)|')
    redis.call('ZREM', inflight, id)
    redis.call('ZREM', started, id)
    redis.call('HDEL', meta_key, id)
    if action == 'ack' then
      redis.call('HDEL', attempts_key, id)
      result = 'ack'
    elseif action == 'release' then
      redis.call('ZADD', key, 'LT', score, member)
      result = 'release'
    else
      local attempts = tonumber(redis.call('HGET', attempts_key, id) or '0') + 1
      if action == 'retry' and attempts < max_retries then
        redis.call('HSET', attempts_key, id, attempts)
        redis.call('ZADD', key, 'NX', string.format('%.3f', now + delay * (2 ^ (attempts - 1))), member)
        result = 'retry'
      else
        redis.call('HDEL', attempts_key, id)
        local filled = string.gsub(record, '"attempts":0', '"attempts":' .. attempts, 1)
        redis.call('HSET', dead_key, id, filled)
        result = 'dead'
      end
    end
  end
  out[#out + 1] = result
end
return out
