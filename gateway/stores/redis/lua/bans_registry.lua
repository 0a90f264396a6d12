-- The shared list of bans in force.  All keys carry one hash tag (one cluster slot).
--
-- KEYS[1] hash   ip -> ban record (JSON, written and read by gateway/stores/redis_bans.py)
-- KEYS[2] zset   change log: ip scored by the sequence number of its last change
-- KEYS[3] string sequence number of the last change
-- KEYS[4] zset   ip scored by the expiry of its ban
-- KEYS[5] string highest sequence number trimmed from the change log
--
-- ARGV[1] is the operation:
--   add ip record expires_at max_bans max_log -> seq of the change, 0 if a ban that
--        lasts at least as long was kept; beyond max_bans the bans closest to their end go
--   del ip max_log                            -> seq of the change, 0 if there was no ban
--   sync since limit full sweep max_log       -> {kind, seq, {ip, record or '', ...}}
--        first removes up to `sweep` expired bans; kind 'none' (nothing changed since
--        `since`), 'delta' (the IPs changed after `since`, with their record or '' if
--        lifted, up to `limit` of them, seq = the last one returned) or 'full' (every
--        ban: asked for, or `since` is not in the log any more, or the counter went
--        back because the data was lost)
local H, L, S, E, T = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local op = ARGV[1]

local function changed(ip, max_log)
  local seq = redis.call('INCR', S)
  redis.call('ZADD', L, seq, ip)
  local extra = redis.call('ZCARD', L) - max_log
  if extra > 0 then
    local last = redis.call('ZRANGE', L, extra - 1, extra - 1, 'WITHSCORES')
    redis.call('SET', T, last[2])
    redis.call('ZREMRANGEBYRANK', L, 0, extra - 1)
  end
  return seq
end

local function remove(ip, max_log)
  redis.call('ZREM', E, ip)
  if redis.call('HDEL', H, ip) == 1 then
    return changed(ip, max_log)
  end
  return 0
end

if op == 'add' then
  local ip, record, expires_at = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local max_bans, max_log = tonumber(ARGV[5]), tonumber(ARGV[6])
  local old = tonumber(redis.call('ZSCORE', E, ip))
  if old ~= nil and old >= expires_at and redis.call('HEXISTS', H, ip) == 1 then
    return 0
  end
  redis.call('HSET', H, ip, record)
  redis.call('ZADD', E, expires_at, ip)
  local seq = changed(ip, max_log)
  local over = redis.call('ZCARD', E) - max_bans
  while over > 0 do
    local first = redis.call('ZRANGE', E, 0, 0)
    remove(first[1], max_log)
    over = over - 1
  end
  return seq
elseif op == 'del' then
  return remove(ARGV[2], tonumber(ARGV[3]))
elseif op == 'sync' then
  local since, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
  local full, sweep, max_log = ARGV[4] == '1', tonumber(ARGV[5]), tonumber(ARGV[6])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local expired = redis.call('ZRANGEBYSCORE', E, '-inf', string.format('%.6f', now),
    'LIMIT', 0, sweep)
  for _, ip in ipairs(expired) do
    remove(ip, max_log)
  end
  local seq = tonumber(redis.call('GET', S)) or 0
  local trimmed = tonumber(redis.call('GET', T)) or 0
  if full or since > seq or since < trimmed then
    return {'full', string.format('%d', seq), redis.call('HGETALL', H)}
  end
  if since == seq then
    return {'none', string.format('%d', seq), {}}
  end
  local log = redis.call('ZRANGEBYSCORE', L, '(' .. string.format('%d', since), '+inf',
    'WITHSCORES', 'LIMIT', 0, limit)
  local out, last = {}, seq
  if #log >= 2 * limit then
    last = tonumber(log[#log])
  end
  for i = 1, #log, 2 do
    out[#out + 1] = log[i]
    out[#out + 1] = redis.call('HGET', H, log[i]) or ''
  end
  return {'delta', string.format('%d', last), out}
end
return redis.error_reply('bans_registry: unknown operation ' .. tostring(op))
