-- Score an IP's abuse events and decide its ban, atomically (one key: cluster-safe).
-- The rules mirror gateway/core/abuse.py (two weighted buckets of window_s); the
-- time is Redis TIME, so every replica scores on the same clock.
--
-- KEYS[1]  the IP's hash: st, cur, prev (score buckets), bu, bm (end and mode of the
--          ban in force), br, bs, ba (its reason, score and start), off, ou (offence
--          count and when it is forgotten), ev (the last scored events, one JSON
--          line each), bev (those of the ban: its evidence)
-- ARGV     window_s, ban_score, ban_s, multiplier, max_ban_s, offence_memory_factor,
--          mode ('enforce' or 'shadow'), the events' evidence (newline-joined lines),
--          then event, points pairs in the order they happened.  While a ban is in force the IP's events are not scored, except
--          that a shadow ban does not hold back an enforcing replica.
-- Returns  {banned 0|1, reason, score, ban_s, offences, now, ban_until}, or, while a
--          ban is in force, {2, its reason, its score, '0', offences, its start, its end}:
--          a replica that never learnt of it (the reply that made it was lost) publishes
--          it then, rather than letting the client go unbanned until it ends
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local ban_score = tonumber(ARGV[2])
local ban_s = tonumber(ARGV[3])
local mult = tonumber(ARGV[4])
local max_ban_s = tonumber(ARGV[5])
local factor = tonumber(ARGV[6])
local mode = ARGV[7]
local MAX_EVIDENCE = 10

-- the last n lines of newline-joined text
local function last_lines(text, n)
  local lines = {}
  for line in string.gmatch(text, '[^\n]+') do
    lines[#lines + 1] = line
  end
  return table.concat(lines, '\n', math.max(1, #lines - n + 1), #lines)
end

local function fmt(x)
  return string.format('%.17g', x)
end

local h = redis.call('HMGET', KEYS[1], 'st', 'cur', 'prev', 'bu', 'off', 'ou', 'bm', 'br',
  'bs', 'ba', 'ev')
local st = tonumber(h[1]) or now
local cur = tonumber(h[2]) or 0
local prev = tonumber(h[3]) or 0
local bu = tonumber(h[4]) or 0
local off = tonumber(h[5]) or 0
local ou = tonumber(h[6]) or 0

if now < bu and not (h[7] == 'shadow' and mode == 'enforce') then
  -- a ban (enforced or shadow) is in force: its events are not scored
  return {2, h[8] or 'abuse', h[9] or '0', '0', tostring(off), h[10] or fmt(now), fmt(bu)}
end

local ev = h[11] or ''
if cur == 0 and prev == 0 then
  st = now
  ev = ''  -- the events of points no longer counted are no evidence
else
  local elapsed = now - st
  if elapsed >= 2 * window then
    st, cur, prev = now, 0, 0
    ev = ''
  elseif elapsed >= window then
    st, cur, prev = st + window, 0, cur
  end
end
local overlap = 1 - math.min(math.max((now - st) / window, 0), 1)
local score = prev * overlap + cur

ev = last_lines(ev .. '\n' .. ARGV[8], MAX_EVIDENCE)

local reason = ''
for i = 9, #ARGV - 1, 2 do
  local points = tonumber(ARGV[i + 1])
  cur = cur + points
  score = score + points
  if score >= ban_score then
    reason = ARGV[i]
    break
  end
end

if reason == '' then
  redis.call('HSET', KEYS[1], 'st', fmt(st), 'cur', fmt(cur), 'prev', fmt(prev), 'ev', ev)
  local keep = 2 * window
  if ou - now > keep then
    keep = ou - now
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(keep * 1000))
  return {0, '', fmt(score), '0', tostring(off), fmt(now), '0'}
end

if ou <= now then
  off = 0
end
off = off + 1
local dur = math.min(ban_s, max_ban_s)
if mult > 1 and off > 1 then
  dur = math.min(dur * mult ^ (off - 1), max_ban_s)
end
bu = now + dur
ou = bu + factor * max_ban_s
redis.call('HSET', KEYS[1], 'st', fmt(now), 'cur', '0', 'prev', '0', 'bu', fmt(bu),
  'bm', mode, 'br', reason, 'bs', fmt(score), 'ba', fmt(now), 'off', tostring(off),
  'ou', fmt(ou), 'bev', ev)
redis.call('HDEL', KEYS[1], 'ev')
redis.call('PEXPIRE', KEYS[1], math.ceil((ou - now) * 1000))
return {1, reason, fmt(score), fmt(dur), tostring(off), fmt(now), fmt(bu)}
