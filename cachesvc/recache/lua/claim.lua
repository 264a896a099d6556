-- Claim due queue entries within the render budget of every daemon together, with a lease each.
-- This script is the one place the budget is computed: with no queue keys it claims nothing and
-- only reports the budget (the API's /status does that).
-- KEYS[1..5]  cachesvc:inflight, cachesvc:inflight:started, cachesvc:inflight:meta, cachesvc:attempts,
--             cachesvc:inflight:ended
-- KEYS[6..]   queues, class by class (high first), ARGV[6] hosts per class
-- ARGV[1] capacity line; ARGV[2] load the Render Services report; ARGV[3] snapshot time of that load;
-- ARGV[4] most entries to claim; ARGV[5] lease (seconds); ARGV[6] hosts; ARGV[7] classes to consider;
-- ARGV[8] the online load the caller estimated before (-1: none yet); ARGV[9] this daemon's id
-- Returns {budget, claims not yet in the load, due work left in later classes (0/1), online load the
--          budget was computed with, claimed_total, the least online load the snapshot allows, then
--          queue, member, score, attempts, token for each claim}.
--
-- The snapshot's load is online traffic plus the recache requests the Render Services were
-- rendering at that moment. Which claims those were cannot be known: a request claimed before the
-- snapshot may not have reached its gateway yet (not in the load), and one its gateway finished may
-- still be on the ledger (no longer in the load). So a snapshot only bounds online traffic:
-- at least `shown` (the load less every claim it could show), at most the whole load. The online
-- load used is the caller's estimate, raised to `shown` and lowered to the load: it rises at once
-- and falls only as far as a snapshot proves, however late requests reach the gateways.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local inflight, started, meta, attempts_key, ended = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local load, snapshot, estimate = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[8])
local claimed_total = redis.call('ZCARD', started)
local unreflected = redis.call('ZCOUNT', started, '(' .. ARGV[3], '+inf')
-- Claims made by the snapshot and ended after it: the snapshot may show them too.
local ended_since = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', ended, '(' .. ARGV[3], '+inf')) do
  local claimed_at = tonumber(string.match(m, '^([^|]*)|'))
  if claimed_at and claimed_at <= snapshot then ended_since = ended_since + 1 end
end
local shown = math.max(0, load - (claimed_total - unreflected) - ended_since)
local online = load
if estimate >= 0 then online = math.min(load, math.max(estimate, shown)) end
local budget = tonumber(ARGV[1]) - online - claimed_total
local n = math.min(budget, tonumber(ARGV[4]))
local hosts, classes = tonumber(ARGV[6]), tonumber(ARGV[7])
local claimed = {}
local stamp = string.format('%.6f', now)
for c = 0, classes - 1 do
  local active = {}
  for h = 1, hosts do active[h] = KEYS[5 + c * hosts + h] end
  while n > 0 and #active > 0 do
    local still = {}
    for _, key in ipairs(active) do
      if n <= 0 then break end
      local e = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1)
      if #e > 0 then
        redis.call('ZREM', key, e[1])
        local id = key .. '\n' .. e[1]
        local attempts = redis.call('HGET', attempts_key, id) or '0'
        local token = ARGV[9] .. '|' .. stamp
        redis.call('ZADD', inflight, now + tonumber(ARGV[5]), id)
        redis.call('ZADD', started, now, id)
        redis.call('HSET', meta, id, e[2] .. '|' .. attempts .. '|' .. token)
        claimed[#claimed + 1] = {key, e[1], e[2], attempts, token}
        n = n - 1
        still[#still + 1] = key
      end
    end
    active = still
  end
end
local more = 0
for i = 5 + hosts + 1, #KEYS do
  if redis.call('ZCOUNT', KEYS[i], '-inf', now) > 0 then more = 1 break end
end
local out = {budget, unreflected, more, online, claimed_total, shown}
for _, e in ipairs(claimed) do
  for _, v in ipairs(e) do out[#out + 1] = v end
end
return out
