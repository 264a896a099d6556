-- End claims: ack (done), retry (back in the queue after a backoff, or dead-lettered once out of
-- attempts), dead (dead-lettered now) or release (back in the queue as it was).
-- KEYS[1..5]  cachesvc:inflight, cachesvc:inflight:started, cachesvc:inflight:meta, cachesvc:attempts,
--             cachesvc:inflight:ended (claim time .. "|" .. id -> end time, kept ENDED_KEEP seconds: a
--             registry snapshot taken before the end may still show the request, see claim.lua)
-- KEYS[6 + 2g], KEYS[7 + 2g]  group g's queue and its host's dead-letter set
-- ARGV  six per group g: member, token, action, delay (seconds), max_retries, dead-letter record
--       (JSON with "attempts":0, filled in here)
-- Returns one outcome per group: ack, retry, dead, release, or gone (the claim is no longer ours).
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ENDED_KEEP = 10  -- seconds; longer than a healthy registry snapshot can be old (3 s)
local inflight, started, meta_key, attempts_key, ended = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
redis.call('ZREMRANGEBYSCORE', ended, '-inf', now - ENDED_KEEP)
local out = {}
for g = 0, #ARGV / 6 - 1 do
  local key, dead_key = KEYS[6 + 2 * g], KEYS[7 + 2 * g]
  local member, token, action = ARGV[g * 6 + 1], ARGV[g * 6 + 2], ARGV[g * 6 + 3]
  local delay, max_retries, record = tonumber(ARGV[g * 6 + 4]), tonumber(ARGV[g * 6 + 5]), ARGV[g * 6 + 6]
  local id = key .. '\n' .. member
  local meta = redis.call('HGET', meta_key, id)
  local result = 'gone'
  if meta and string.sub(meta, -#token) == token then
    local score = string.match(meta, '^([^|]*)|')
    local claimed_at = redis.call('ZSCORE', started, id)
    if claimed_at then
      redis.call('ZADD', ended, now, claimed_at .. '|' .. id)
    end
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
redis.call('EXPIRE', ended, ENDED_KEEP)  -- no-op when nothing ended
return out
