-- Put every dead-lettered entry of one host back in its queue, due now.
-- KEYS[1]  the host's dead-letter set (HASH cachesvc:deadletter:{host}, field = queue key .. "\n" .. member)
-- ARGV     none (each entry's queue key is the first line of its field)
-- Returns the number of entries re-queued.
local t = redis.call('TIME')
local fields = redis.call('HKEYS', KEYS[1])
for _, id in ipairs(fields) do
  local nl = string.find(id, '\n', 1, true)
  redis.call('ZADD', string.sub(id, 1, nl - 1), 'NX', t[1], string.sub(id, nl + 1))
  redis.call('HDEL', KEYS[1], id)
end
return #fields
