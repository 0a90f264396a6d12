-- Change the shared break-glass allow list (one hash tag: cluster-safe).
--
-- KEYS[1]  {P allow}      hash: entry name -> JSON record
-- KEYS[2]  {P allow}:exp  zset: entry name by the end of its entry (unix time)
-- KEYS[3]  {P allow}:v    version: a new random token on every change, so replicas
--                         re-read the hash only when it changed (a token, not a
--                         counter: a Redis that lost its data starts no count again
--                         that a replica could mistake for the one it read)
-- ARGV     'set', name, token, record, expires_at, max entries  |  'del', name, token
-- Returns  {code, version}: set: 1 made, 0 no room; del: 1 removed, 0 none.
-- Expired entries are dropped first, on every call.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
local changed = #gone > 0
if changed then
  redis.call('HDEL', KEYS[1], unpack(gone))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
end

local code = 0
local name = ARGV[2]
if ARGV[1] == 'set' then
  if redis.call('HEXISTS', KEYS[1], name) == 1
    or redis.call('HLEN', KEYS[1]) < tonumber(ARGV[6]) then
    redis.call('HSET', KEYS[1], name, ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[5], name)
    code = 1
  end
else
  code = redis.call('HDEL', KEYS[1], name)
  redis.call('ZREM', KEYS[2], name)
end
if code == 1 or changed then
  redis.call('SET', KEYS[3], ARGV[3])
end
return code
