-- Add members to one recache queue, all or nothing under the high-queue cap.
-- KEYS[1]  the queue (ZSET recache:{host}:{priority})
-- ARGV[1]  cap on the queue's size (0 = none); ARGV[2] score for every member; ARGV[3..] members
-- Returns {1, members written, 0}, or {0, room left under the cap, new members} when refused.
local limit = tonumber(ARGV[1])
if limit > 0 then
  local count = redis.call('ZCARD', KEYS[1])
  local new, seen = 0, {}
  for i = 3, #ARGV do
    local m = ARGV[i]
    if not seen[m] then
      seen[m] = true
      if not redis.call('ZSCORE', KEYS[1], m) then new = new + 1 end
    end
  end
  if count + new > limit then return {0, limit - count, new} end
end
for i = 3, #ARGV, 500 do
  local args = {}
  for j = i, math.min(i + 499, #ARGV) do
    args[#args + 1] = ARGV[2]
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
return {1, #ARGV - 2, 0}
