-- The quota's admission, atomic in Redis (quota_redis.py; quota_local.py keeps the same counts in-process).
--
-- KEYS[1]  the requests limit: the theoretical arrival time (GCRA), in microseconds of Redis's TIME
-- KEYS[2]  the tokens-per-minute window: a hash of {bucket: tokens}, 60 buckets to a minute
-- KEYS[3]  the tokens-per-day count: a hash of {day, used}
-- ARGV[1]  seven whole numbers, space-separated: requests per minute, tokens per minute, tokens per day
--          (0: no such limit), the cost in tokens, the minute and the day in microseconds, and 1 to book
--          the request when admitted (0: only look)
--
-- Returns ten whole numbers, space-separated (quota_redis._raw reads them): the limit that refused
-- (0 none, 1 requests, 2 tokens per minute, 3 tokens per day), the wait in ms before a retry can pass (-1: never),
-- the requests left in the minute, ms until the requests limit is full again, the tokens used in the minute,
-- ms until they reset, the tokens used in the day, ms until the day resets, the minute bucket and the day.
-- Every number is written with %.0f: tostring writes 1e+15 from 1e14 up.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local a = {}
for v in string.gmatch(ARGV[1], '%S+') do
  a[#a + 1] = tonumber(v)
end
local rpm, tpm, tpd, cost, minute, daylen, commit = a[1], a[2], a[3], a[4], a[5], a[6], a[7] == 1

-- The refusal reported is the one with the longest wait; a limit that can never pass (-1) wins.
local refused, wait = 0, 0
local function worse(limit, w)
  if wait == -1 or (refused > 0 and w ~= -1 and w <= wait) then
    return
  end
  refused, wait = limit, w
end

-- Requests per minute.
local interval = 0
if rpm > 0 then
  interval = minute / rpm
end
-- TIME can step back: an arrival time past now + the window is clamped (as if the burst was just used)
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat > now + minute then
  tat = now + minute
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(minute / 1000) + 1000)
end
tat = math.max(tat, now)
if commit then
  tat = tat + interval
end
if rpm > 0 and tat - now > minute + 1 then
  worse(1, tat - minute - now)
end

-- Tokens per minute: the buckets of the last minute; older ones, or ones stamped in the future, are dropped.
local width = minute / 60
local bucket = math.floor(now / width)
local entries = redis.call('HGETALL', KEYS[2])
local buckets, used = {}, 0
for i = 1, #entries, 2 do
  local b, n = tonumber(entries[i]), tonumber(entries[i + 1])
  if b <= bucket - 60 or b > bucket then
    redis.call('HDEL', KEYS[2], entries[i])
  else
    table.insert(buckets, {b, n})
    used = used + n
  end
end
if tpm > 0 and used + cost > tpm then
  -- the wait: until enough of the oldest buckets have left the window (-1 when the cost alone is over)
  table.sort(buckets, function(x, y) return x[1] < y[1] end)
  local over, w = used + cost - tpm, -1
  for _, e in ipairs(buckets) do
    over = over - e[2]
    if over <= 0 then
      w = (e[1] + 60) * width - now
      break
    end
  end
  worse(2, w)
end

-- Tokens per day.
local day = math.floor(now / daylen)
local stored = redis.call('HMGET', KEYS[3], 'day', 'used')
local day_used = 0
if tonumber(stored[1]) == day then
  day_used = tonumber(stored[2])
end
if tpd > 0 and day_used + cost > tpd then
  if cost > tpd then
    worse(3, -1)
  else
    worse(3, (day + 1) * daylen - now)
  end
end

-- Booked only when every limit admits it; each key expires a second after it stops mattering.
if commit and refused == 0 then
  if rpm > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
  end
  if tpm > 0 then
    redis.call('HINCRBY', KEYS[2], string.format('%.0f', bucket), string.format('%.0f', cost))
    redis.call('PEXPIRE', KEYS[2], math.ceil(minute / 1000) + 1000)
    used = used + cost
    table.insert(buckets, {bucket, cost})
  end
  if tpd > 0 then
    day_used = day_used + cost
    redis.call('HSET', KEYS[3], 'day', string.format('%.0f', day), 'used', string.format('%.0f', day_used))
    redis.call('PEXPIRE', KEYS[3], math.ceil(((day + 1) * daylen - now) / 1000) + 1000)
  end
elseif commit then
  tat = tat - interval
end

local remaining = 0
if rpm > 0 then
  remaining = math.floor((minute - (tat - now)) / interval + 1e-6)
end
local minute_reset = 0
for _, e in ipairs(buckets) do
  if e[2] ~= 0 then
    minute_reset = math.max(minute_reset, (e[1] + 60) * width - now)
  end
end

local function ms(us)
  if us < 0 then
    return '-1'
  end
  return string.format('%.0f', math.ceil(us / 1000))
end
local function n(x)
  return string.format('%.0f', x)
end
return table.concat({
  n(refused), ms(wait), n(remaining), ms(tat - now), n(used), ms(minute_reset), n(day_used),
  ms((day + 1) * daylen - now), n(bucket), n(day),
}, ' ')
