-- Settling a shared reservation. ARGV[1]: JSON {p, id, delta, windows = [[scope, name]...],
-- slots = [scope...], op = "correct" | "release" | "restamp"}, or {p, op = "renew",
-- held = [[id, [scope...]]...], lease (ms)}.
-- correct: add delta to the reservation's token entries, at their original time (an entry
-- already expired is left alone). release: free its concurrency slots. renew: extend them.
-- restamp: move its window entries to now (later only: no window ever holds more).
local a = cjson.decode(ARGV[1])
local P = a.p
if a.op == 'correct' then
  for _, w in ipairs(a.windows) do
    local k = P .. ':w:' .. w[1] .. ':' .. w[2]
    if redis.call('ZSCORE', k, a.id) and redis.call('HEXISTS', k .. ':a', a.id) == 1 then
      redis.call('HINCRBY', k .. ':a', a.id, a.delta)
      redis.call('INCRBY', k .. ':u', a.delta)
    end
  end
  return 1
end
if a.op == 'release' then
  for _, s in ipairs(a.slots) do redis.call('ZREM', P .. ':c:' .. s, a.id) end
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
if a.op == 'restamp' then
  for _, w in ipairs(a.windows) do
    local k = P .. ':w:' .. w[1] .. ':' .. w[2]
    local at = redis.call('ZSCORE', k, a.id)
    if at and tonumber(at) < now then redis.call('ZADD', k, 'XX', now, a.id) end
  end
  return 1
end
for _, h in ipairs(a.held) do
  for _, s in ipairs(h[2]) do
    redis.call('ZADD', P .. ':c:' .. s, 'XX', now + a.lease, h[1])
  end
end
return 1
