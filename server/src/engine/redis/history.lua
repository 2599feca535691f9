-- Reads a channel's position and a slice of its history in one snapshot. Makes the epoch if the
-- channel has none, so a position handed to a client stays valid until history is really lost.
-- KEYS: 1 stream, 2 meta
-- ARGV: 1 'after' | 'latest', 2 offset (for 'after'), 3 limit, 4 epoch to use if none,
--       5 meta ttl (s), 6 history size, 7 history ttl (s)
-- A channel nobody ever published to keeps its meta only for the history ttl: it holds nothing
-- worth an hour of a key per channel name anyone subscribed to.
-- XADD trims with MAXLEN ~, so the stream may hold a little more than the history size; reads
-- never go below top - size, so replay answers exactly as with an exact trim (and as the memory
-- engine does).
-- Returns {epoch, top, entries} with entries as XRANGE returns them, oldest first.
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[2], 'epoch', epoch)
end
local top = tonumber(redis.call('HGET', KEYS[2], 'top') or '0')
if top == 0 then
  redis.call('EXPIRE', KEYS[2], ARGV[7])
else
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
local size = tonumber(ARGV[6])
local limit = math.min(tonumber(ARGV[3]), size)
local entries = {}
if limit > 0 then
  if ARGV[1] == 'after' then
    local after = math.max(tonumber(ARGV[2]), top - size)
    -- Past the top there is nothing to read; an offset beyond 2^53 would not even print as an
    -- integer. Below it, %d writes the id XRANGE needs.
    if after < top then
      entries = redis.call('XRANGE', KEYS[1], '(' .. string.format('%d', after) .. '-0', '+', 'COUNT', limit)
    end
  else
    local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    for i = #newest, 1, -1 do
      entries[#entries + 1] = newest[i]
    end
  end
end
return {epoch, top, entries}
