-- The quota's settlement, atomic in Redis (quota_redis.py): a reservation made by admit.lua corrected to the
-- tokens Groq reported, and a request given back to the requests limit.
--
-- KEYS     as admit.lua's: the requests limit, the tokens-per-minute buckets, the tokens-per-day count
-- ARGV[1]  the tokens to add (usage minus reservation; negative gives tokens back), 0: none
-- ARGV[2]  the minute bucket of the reservation: corrected only while it is still in the window
-- ARGV[3]  the day of the reservation: corrected only while it is still the stored day
-- ARGV[4]  microseconds to give back to the requests limit (0: none)

local back = tonumber(ARGV[4])
if back > 0 then
  local tat = redis.call('GET', KEYS[1])
  if tat then
    redis.call('SET', KEYS[1], string.format('%.0f', tonumber(tat) - back), 'KEEPTTL')
  end
end
local delta = tonumber(ARGV[1])
if delta ~= 0 then
  if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[2], delta)
  end
  if redis.call('HGET', KEYS[3], 'day') == ARGV[3] then
    redis.call('HINCRBY', KEYS[3], 'used', delta)
  end
end
return 1
