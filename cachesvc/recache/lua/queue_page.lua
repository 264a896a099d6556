-- One page of several queues read as one list (each in score order, the queues one after another).
-- KEYS     the queues, in listing order
-- ARGV[1]  offset into the combined list; ARGV[2] page size
-- Returns {total entries, then key index (1-based), member, score for each entry of the page}.
-- Reads only the page: ZCARD of each queue, then ZRANGE of the slices that overlap it.
local offset, size = tonumber(ARGV[1]), tonumber(ARGV[2])
local total, out = 0, {0}
for i = 1, #KEYS do
  local count = redis.call('ZCARD', KEYS[i])
  local first, last = math.max(offset, total), math.min(offset + size, total + count) - 1
  if first <= last then
    local slice = redis.call('ZRANGE', KEYS[i], first - total, last - total, 'WITHSCORES')
    for j = 1, #slice, 2 do
      out[#out + 1] = i
      out[#out + 1] = slice[j]
      out[#out + 1] = slice[j + 1]
    end
  end
  total = total + count
end
out[1] = total
return out
