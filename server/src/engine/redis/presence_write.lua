-- Writes presence entries and pushes out their lapse times and both keys' expiry: one call for a
-- join, one per refresh batch (all its keys in one slot).
-- KEYS: per entry, the channel's presence hash (conn -> JSON), then its expiry zset (conn -> lapse)
-- ARGV: 1 lapse time (ms), 2 the keys' expiry (s), then per entry its conn id and client JSON
local lapse, keep = ARGV[1], ARGV[2]
for i = 1, #KEYS / 2 do
  local hash, zset = KEYS[2 * i - 1], KEYS[2 * i]
  local conn = ARGV[2 * i + 1]
  redis.call('HSET', hash, conn, ARGV[2 * i + 2])
  redis.call('ZADD', zset, lapse, conn)
  redis.call('EXPIRE', hash, keep)
  redis.call('EXPIRE', zset, keep)
end
return #KEYS / 2
