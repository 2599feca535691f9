-- Bans: the hash KEYS[1] (user -> until, Unix ms) and the pub/sub channel of the same name, on
-- which every change is announced in the same call (so no node can miss a change that was
-- stored, short of missing the channel itself, after which it loads the hash again).
-- ARGV: 1 mode; "ban": 2 user, 3 until (ms), 4 the announcement; returns 1
--                "unban": 2 user, 3 now (ms), 4 the announcement; returns 1 if a ban was lifted
--                "load": 2 now (ms); drops lapsed bans, returns the rest as user, until, ...
local mode = ARGV[1]
if mode == 'ban' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PUBLISH', KEYS[1], ARGV[4])
  return 1
elseif mode == 'unban' then
  local until_ms = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
  redis.call('HDEL', KEYS[1], ARGV[2])
  redis.call('PUBLISH', KEYS[1], ARGV[4])
  if until_ms > tonumber(ARGV[3]) then return 1 end
  return 0
end
local all = redis.call('HGETALL', KEYS[1])
local now, live, lapsed = tonumber(ARGV[2]), {}, {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) > now then
    live[#live + 1] = all[i]
    live[#live + 1] = all[i + 1]
  else
    lapsed[#lapsed + 1] = all[i]
  end
end
for i = 1, #lapsed, 500 do
  redis.call('HDEL', KEYS[1], unpack(lapsed, i, math.min(i + 499, #lapsed)))
end
return live
