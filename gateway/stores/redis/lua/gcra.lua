-- GCRA rate-limit decisions for one or more keys, atomically, on Redis's clock.
--
-- The state of a key is its theoretical arrival time (TAT, integer microseconds on
-- the Redis server's clock): the instant its bucket is full again.  It is stored
-- with an expiry at that instant, so a refilled key simply disappears.
-- Redis's own clock is used (never the callers'): replicas' clocks differ.
--
-- KEYS     the keys to decide, one request each, in order (a key may repeat: it is
--          read and written once, its requests decided in order)
-- ARGV[1]  "1": consume the budget of allowed requests; "0": only answer (peek)
-- ARGV[2]  for each key, the 1-based index of its rate, space-separated ("1 1 2")
-- ARGV[3]  for each key, its cost (the budget units it takes, integer >= 1),
--          space-separated; "" when every key costs 1
-- ARGV[4], ARGV[5], ...  the rates: emission interval T in microseconds (integer
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
-- A key may come many times in one call (one client's concurrent requests): it is read
-- once, decided in order in `tats`, and written once at the end with its last TAT.
local tats = {}
local dirty = {}
local costs = {}
local c = 0
for cost in string.gmatch(ARGV[3], '%d+') do
  c = c + 1
  costs[c] = tonumber(cost)
end
local i = 0
for index in string.gmatch(ARGV[2], '%d+') do
  i = i + 1
  local key = KEYS[i]
  local a = 2 + 2 * tonumber(index)
  local emission = tonumber(ARGV[a])
  local tolerance = emission * tonumber(ARGV[a + 1])
  local tat = tats[key]
  if tat == nil then
    tat = tonumber(redis.call('GET', key)) or now
  end
  if tat < now then
    tat = now
  end
  -- a refused request takes nothing; one that costs more than is left is refused
  local new_tat = tat + emission * (costs[i] or 1)
  local slack = tolerance - (new_tat - now)
  local n = #out
  if slack < 0 then
    tats[key] = tat
    out[n + 1] = 0
    out[n + 2] = 0
    out[n + 3] = -slack
    out[n + 4] = tat - now
  else
    if consume then
      tats[key] = new_tat
      dirty[key] = true
    else
      tats[key] = tat
    end
    out[n + 1] = 1
    out[n + 2] = math.floor(slack / emission)
    out[n + 3] = 0
    out[n + 4] = new_tat - now
  end
end
for key in pairs(dirty) do
  local tat = tats[key]
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
return out
