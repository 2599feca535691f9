-- Stores one message and fans it out, atomically: history and pub/sub order are the same, and
-- offsets are contiguous within an epoch.
-- KEYS: 1 stream, 2 meta, 3 idempotency key (optional)
-- ARGV: 1 pub/sub channel, 2 data (JSON text), 3 event ('' = none), 4 event as JSON ('null' or
--       a JSON string), 5 time (us), 6 history size, 7 history ttl (s), 8 meta ttl (s),
--       9 epoch to use if the channel has none, 10 idempotency ttl (s), 11 'PUBLISH', or
--       'SPUBLISH' on a Redis Cluster (the pub/sub channel shares the keys' slot)
-- Returns {offset, epoch, duplicate (0|1)}
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local sep = string.find(seen, ':', 1, true)
    return {tonumber(string.sub(seen, sep + 1)), string.sub(seen, 1, sep - 1), 1}
  end
end
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[9]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
if top == 1 then
  -- A new epoch: whatever stream is left belongs to the old one.
  redis.call('DEL', KEYS[1])
end
local id = top .. '-0'
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'd', ARGV[2], 't', ARGV[5], 'e', ARGV[3])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[6], id, 'd', ARGV[2], 't', ARGV[5])
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[8])
redis.call(ARGV[11], ARGV[1],
  '{"k":"m","e":"' .. epoch .. '","o":' .. top .. ',"t":' .. ARGV[5] .. ',"v":' .. ARGV[4] .. ',"d":' .. ARGV[2] .. '}')
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. ':' .. top, 'EX', ARGV[10])
end
return {top, epoch, 0}
