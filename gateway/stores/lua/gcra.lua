-- GCRA rate-limit decisions for one or more keys, atomically, on Redis's clock.
--
-- The state of a key is its theoretical arrival time (TAT, integer microseconds on
-- the Redis server's clock): the instant its bucket is full again.  It is stored
-- with an expiry at that instant, so a refilled key simply disappears.
-- Redis's own clock is used (never the callers'): replicas' clocks differ.
--
-- KEYS     the keys to decide, one request each, in order (a key may repeat)
-- ARGV[1]  "1": consume the budget of allowed requests; "0": only answer (peek)
-- ARGV[2]  for each key, the 1-based index of its rate, space-separated ("1 1 2")
-- ARGV[3], ARGV[4], ...  the rates: emission interval T in microseconds (integer
--          >= 1) then burst (integer >= 1), for rate 1, rate 2, ...
-- Returns a flat array, four integers per key:
--   allowed (1 | 0), remaining, retry_after_us, reset_us
if redis.replicate_commands then
  redis.replicate_commands()  -- Redis < 5: replicate effects, so TIME may precede writes
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local consume = ARGV[1] == '1'
local out = {}
local i = 0
for index in string.gmatch(ARGV[2], '%d+') do
  i = i + 1
  local key = KEYS[i]
  local a = 1 + 2 * tonumber(index)
  local emission = tonumber(ARGV[a])
  local tolerance = emission * tonumber(ARGV[a + 1])
  local tat = tonumber(redis.call('GET', key))
  if tat == nil or tat < now then
    tat = now
  end
  local new_tat = tat + emission
  local slack = tolerance - (new_tat - now)
  local n = #out
  if slack < 0 then
    out[n + 1] = 0
    out[n + 2] = 0
    out[n + 3] = -slack
    out[n + 4] = tat - now
  else
    if consume then
      redis.call('SET', key, string.format('%.0f', new_tat),
                 'PX', math.ceil((new_tat - now) / 1000))
    end
    out[n + 1] = 1
    out[n + 2] = math.floor(slack / emission)
    out[n + 3] = 0
    out[n + 4] = new_tat - now
  end
end
return out
