-- GCRA rate-limit decisions for one or more keys, atomically, on Redis's clock.
--
-- The state of a key is its theoretical arrival time (TAT, integer microseconds on
-- the Redis server's clock): the instant its bucket is full again.  It is stored
-- with an expiry at that instant, so a refilled key simply disappears.
-- Redis's own clock is used (never the callers'): replicas' clocks differ.
--
-- A calendar quota (period 1 hour, 2 day, 3 month: UTC windows) is the same decision on
-- a virtual clock in whole units (gateway/core/calendar.py): window i is the instant
-- i * quota, each request advances the TAT by its cost, and the key expires when its
-- window ends.
--
-- KEYS     the keys to decide, one request each, in order (a key may repeat: it is
--          read and written once, its requests decided in order)
-- ARGV[1]  "1": consume the budget of allowed requests; "0": only answer (peek)
-- ARGV[2]  for each key, the 1-based index of its rate, space-separated ("1 1 2")
-- ARGV[3]  for each key, its cost (the budget units it takes, integer >= 1),
--          space-separated; "" when every key costs 1
-- ARGV[4], ARGV[5], ...  the rates, three values each: emission interval T in
--          microseconds (integer >= 1; 1 for a calendar quota), burst (integer >= 1;
--          the quota), period (0 rolling, 1 hour, 2 day, 3 month)
-- Returns a flat array, two integers per key (half the reply a caller parses):
--   allowed: remaining (>= 0), reset_us
--   refused: -(retry_after_us + 1) (<= -1), reset_us
if redis.replicate_commands then
  redis.replicate_commands()  -- Redis < 5: replicate effects, so TIME may precede writes
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local consume = ARGV[1] == '1'
local floor = math.floor

-- days since 1970-01-01 of a civil date (proleptic Gregorian; H. Hinnant's algorithm)
local function days_from_civil(y, m, d)
  if m <= 2 then
    y = y - 1
  end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m > 2) and (m - 3) or (m + 9)
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- the current window of a period: its number since the epoch, its end (microseconds)
local windows = {}
local function window(period)
  local w = windows[period]
  if w == nil then
    local sec = tonumber(t[1])
    local index, ends
    if period == 1 then
      index = floor(sec / 3600)
      ends = (index + 1) * 3600
    elseif period == 2 then
      index = floor(sec / 86400)
      ends = (index + 1) * 86400
    else
      local z = floor(sec / 86400) + 719468
      local era = floor(z / 146097)
      local doe = z - era * 146097
      local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
      local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
      local mp = floor((5 * doy + 2) / 153)
      local m = (mp < 10) and (mp + 3) or (mp - 9)
      local y = yoe + era * 400
      if m <= 2 then
        y = y + 1
      end
      index = y * 12 + m - 1
      if m == 12 then
        ends = days_from_civil(y + 1, 1, 1) * 86400
      else
        ends = days_from_civil(y, m + 1, 1) * 86400
      end
    end
    w = {index, ends * 1000000}
    windows[period] = w
  end
  return w[1], w[2]
end

local out = {}
-- A key may come many times in one call (one client's concurrent requests): it is read
-- once, decided in order in `tats`, and written once at the end with its last TAT.
local tats = {}
local dirty = {}
local expires = {}  -- a calendar key's expiry (its window's end), microseconds
local costs = {}
if ARGV[3] ~= '' then
  local c = 0
  for cost in string.gmatch(ARGV[3], '%d+') do
    c = c + 1
    costs[c] = tonumber(cost)
  end
end
-- each rate's three values, read once per call (keys of one rate repeat in a batch)
local rates = {}
local i = 0
for index in string.gmatch(ARGV[2], '%d+') do
  i = i + 1
  local key = KEYS[i]
  local rate = rates[index]
  if rate == nil then
    local a = 1 + 3 * tonumber(index)
    rate = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
    rates[index] = rate
  end
  local emission, burst, period = rate[1], rate[2], rate[3]
  local cost = costs[i] or 1
  local n = #out
  if period == 0 then
    local tolerance = emission * burst
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key)) or now
    end
    if tat < now then
      tat = now
    end
    -- a refused request takes nothing; one that costs more than is left is refused
    local new_tat = tat + emission * cost
    local slack = tolerance - (new_tat - now)
    if slack < 0 then
      tats[key] = tat
      out[n + 1] = slack - 1
      out[n + 2] = tat - now
    else
      if consume then
        tats[key] = new_tat
        dirty[key] = true
      else
        tats[key] = tat
      end
      out[n + 1] = floor(slack / emission)
      out[n + 2] = new_tat - now
    end
  else
    local index_now, ends = window(period)
    local vnow = index_now * burst
    local tat = tats[key]
    if tat == nil then
      tat = tonumber(redis.call('GET', key)) or vnow
    end
    if tat < vnow then
      tat = vnow
    end
    local used = tat - vnow + cost
    local left = ends - now
    if used > burst then
      tats[key] = tat
      out[n + 1] = -left - 1
      out[n + 2] = left
    else
      if consume then
        tats[key] = tat + cost
        dirty[key] = true
        expires[key] = ends
      else
        tats[key] = tat
      end
      out[n + 1] = burst - used
      out[n + 2] = left
    end
  end
end
for key in pairs(dirty) do
  local tat = tats[key]
  local ends = expires[key] or tat
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((ends - now) / 1000))
end
return out
