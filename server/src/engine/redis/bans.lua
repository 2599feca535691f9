-- Bans: the hash KEYS[1] (user -> until, Unix ms) and the pub/sub channel of the same name, on
-- which every change is announced in the same call (so no node can miss a change that was
-- stored, short of missing the channel itself, after which it reads the hash again). Nodes read
-- the hash with HGETALL (a read, so it works while Redis refuses writes).
-- ARGV: 1 mode, 2 user, 3 "ban": until (ms), "unban": now (ms), 4 the announcement, 5 now (ms)
-- "ban" also drops lapsed bans and returns 1; "unban" returns 1 if a ban was lifted.
local mode, user = ARGV[1], ARGV[2]
if mode == 'ban' then
  local all, now, lapsed = redis.call('HGETALL', KEYS[1]), tonumber(ARGV[5]), {}
  for i = 1, #all, 2 do
    if tonumber(all[i + 1]) <= now then
      lapsed[#lapsed + 1] = all[i]
    end
  end
  for i = 1, #lapsed, 500 do
    redis.call('HDEL', KEYS[1], unpack(lapsed, i, math.min(i + 499, #lapsed)))
  end
  redis.call('HSET', KEYS[1], user, ARGV[3])
  redis.call('PUBLISH', KEYS[1], ARGV[4])
  return 1
end
local until_ms = tonumber(redis.call('HGET', KEYS[1], user) or '0')
redis.call('HDEL', KEYS[1], user)
redis.call('PUBLISH', KEYS[1], ARGV[4])
if until_ms > tonumber(ARGV[3]) then
  return 1
end
return 0
