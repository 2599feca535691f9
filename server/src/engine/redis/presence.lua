-- Lists a channel's present clients after dropping entries whose node stopped refreshing them.
-- KEYS: 1 presence hash (conn -> JSON), 2 expiry zset (conn -> lapse time, ms)
-- ARGV: 1 now (ms)
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for i = 1, #lapsed, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #lapsed) do
    chunk[#chunk + 1] = lapsed[j]
  end
  redis.call('HDEL', KEYS[1], unpack(chunk))
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
return redis.call('HVALS', KEYS[1])
