-- Settling a shared reservation. ARGV[1]: JSON {p, op, id, ...}; times in ms of Redis's clock.
-- op "settle": {id, delta, windows = [[scope, name]...], release, slots = [scope...],
--   flight = [fp, scope, member], report}: in this order, add delta to the reservation's token
--   entries at their original time (an entry already expired is left alone); when release,
--   free its concurrency slots and its place among the key's requests in flight; then take
--   the provider's report (below). {many = [settle...]}: each of them, in turn.
-- op "renew": {held = [[id, [scope...], [fp, scope, member] or {}]...], lease}: extend the
--   slots and places in flight of running requests.
-- op "restamp": {windows}: move the reservation's window entries to now (later only: no
--   window ever holds more).
-- op "count": {counts = [[fp, name, n]...]}: add to the keys' counters.
-- A report {fp, scope, except (the answered request's member), gf, cap,
--   windows = [[name, limit (-1: unknown), remaining, reset_in]]}
-- replaces the key's budget of each window (core/budget.py's Budgets.observe): reported now,
-- with every other request in flight on the key as sent since (the provider may not have
-- counted them yet, whichever process sent them).
local a = cjson.decode(ARGV[1])
local P = a.p
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

-- A report replaces the budget only when its request was admitted no earlier than the one
-- whose report the budget holds: answers read out of order must not bring back an older
-- state. (Dropping an older report undercounts nothing: its request was in flight, so counted
-- as sent, when the newer report was taken.)
local function report(r)
  local h = P .. ':b:' .. r.fp .. ':' .. r.scope
  local f = P .. ':fl:' .. r.fp .. ':' .. r.scope
  local at = string.find(r.except, '@', 1, true)
  local adm = (at and tonumber(string.sub(r.except, at + 1))) or now
  redis.call('ZREMRANGEBYSCORE', f, '-inf', string.format('%.3f', now))
  local flying = redis.call('ZRANGE', f, 0, -1)
  local keep = 0
  for _, w in ipairs(r.windows) do
    local name, reset = w[1], now + math.max(0, w[4])
    local longest, newer = 0, true
    local old = redis.call('HGET', h, name)
    if old then
      local o = cjson.decode(old)
      longest = math.max(1000, o.longest, o.reset - o.seen)
      newer = o.adm == nil or adm >= o.adm
    end
    if newer then
      local period = math.max(1000, longest, reset - now)
      local b = {l = w[2], r = w[3], reset = reset, seen = now, longest = longest, adm = adm,
        guard = math.min(r.gf * period, 250), cap = r.cap}
      redis.call('HSET', h, name, cjson.encode(b))
      local s = P .. ':bs:' .. r.fp .. ':' .. r.scope .. ':' .. name
      redis.call('DEL', s)
      for _, m in ipairs(flying) do
        local sep = m ~= r.except and string.find(m, '@', 1, true)
        if sep then
          redis.call('ZADD', s, tonumber(string.sub(m, sep + 1)), string.sub(m, 1, sep - 1))
        end
      end
      -- Kept while it can still bind: through its reset, then as long as its window slides.
      keep = math.max(keep, math.ceil(reset - now + 10 * period) + 60000)
      if #flying > 0 then redis.call('PEXPIRE', s, keep) end
    end
  end
  -- Every window of the hash lives as long as the longest-lived one.
  if keep > redis.call('PTTL', h) then redis.call('PEXPIRE', h, keep) end
end

local function settle(s)
  if s.delta ~= 0 then
    for _, w in ipairs(s.windows) do
      local k = P .. ':w:' .. w[1] .. ':' .. w[2]
      if redis.call('ZSCORE', k, s.id) and redis.call('HEXISTS', k .. ':a', s.id) == 1 then
        redis.call('HINCRBY', k .. ':a', s.id, s.delta)
        redis.call('INCRBY', k .. ':u', s.delta)
      end
    end
  end
  if s.release then
    for _, c in ipairs(s.slots) do redis.call('ZREM', P .. ':c:' .. c, s.id) end
    if s.flight[1] then
      redis.call('ZREM', P .. ':fl:' .. s.flight[1] .. ':' .. s.flight[2], s.flight[3])
    end
  end
  if s.report then report(s.report) end
end

if a.op == 'settle' then
  if a.many then
    for _, s in ipairs(a.many) do settle(s) end
  else
    settle(a)
  end
  return 1
end
if a.op == 'count' then
  for _, c in ipairs(a.counts) do redis.call('HINCRBY', P .. ':n:' .. c[1], c[2], c[3]) end
  return 1
end
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
  local f = h[3]
  if f[1] then
    redis.call('ZADD', P .. ':fl:' .. f[1] .. ':' .. f[2], 'XX', now + a.lease, f[3])
  end
end
return 1
