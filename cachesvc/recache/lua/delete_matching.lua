-- A few SCAN steps over one host's metadata keys, deleting what they find.
-- KEYS     none (the keys are found by SCAN)
-- ARGV[1]  SCAN cursor; ARGV[2] key prefix (meta:cache:{host}:); ARGV[3] COUNT per step;
-- ARGV[4]  steps in this call; ARGV[5..] dimension ids to delete (none: every dimension)
-- Returns {next cursor, keys deleted}.
local cursor, deleted, filter = ARGV[1], 0, nil
local prefix = ARGV[2]
if #ARGV >= 5 then
  filter = {}
  for i = 5, #ARGV do filter[ARGV[i]] = true end
end
for round = 1, tonumber(ARGV[4]) do
  local res = redis.call('SCAN', cursor, 'MATCH', prefix .. '*', 'COUNT', ARGV[3])
  cursor = res[1]
  for _, key in ipairs(res[2]) do
    local keep = false
    if filter then
      local dim = string.match(string.sub(key, #prefix + 1), '^([^:]*):')
      keep = not (dim and filter[dim])
    end
    if not keep then deleted = deleted + redis.call('DEL', key) end
  end
  if cursor == '0' then break end
end
return {cursor, deleted}
