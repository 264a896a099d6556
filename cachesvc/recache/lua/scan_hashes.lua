-- One SCAN step, with the fields of each hash it finds.
-- KEYS     none (the keys are found by SCAN)
-- ARGV[1]  SCAN cursor; ARGV[2] MATCH pattern; ARGV[3] COUNT
-- Returns {next cursor, key, {field, value, ...}, key, {...}, ...}; a key that is not a hash has no fields.
local res = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local out = {res[1]}
for _, key in ipairs(res[2]) do
  local h = redis.pcall('HGETALL', key)
  if type(h) ~= 'table' or h['err'] then h = {} end
  out[#out + 1] = key
  out[#out + 1] = h
end
return out
