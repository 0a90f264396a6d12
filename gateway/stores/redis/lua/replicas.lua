-- Announce (or withdraw) a gateway replica and count the live ones, on Redis's clock.
--
-- KEYS[1]  sorted set: member = replica id, score = expiry (milliseconds)
-- ARGV[1]  replica id
-- ARGV[2]  time to live in milliseconds
-- ARGV[3]  "1": announce; "0": withdraw
-- Returns the number of live replicas.
if redis.replicate_commands then
  redis.replicate_commands()  -- Redis < 5: replicate effects, so TIME may precede writes
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl * 4))
return redis.call('ZCARD', KEYS[1])
