-- How many entries are in flight, for all daemons together and for one queue-key prefix.
-- KEYS[1]  cachesvc:inflight (ZSET id -> lease expiry); KEYS[2] cachesvc:inflight:started (ZSET id -> claim time)
-- ARGV[1]  snapshot time: claims after it are not yet reflected in the reported load
-- ARGV[2]  id prefix to count (recache:{host}:), or '' for none
-- Returns {in flight, of those claimed after the snapshot, of those with the prefix}.
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
local unreflected = redis.call('ZCOUNT', KEYS[2], '(' .. ARGV[1], '+inf')
local prefix = ARGV[2]
local mine = 0
for _, id in ipairs(ids) do
  if prefix ~= '' and string.sub(id, 1, #prefix) == prefix then mine = mine + 1 end
end
return {#ids, unreflected, mine}
