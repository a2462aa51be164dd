-- Admission of one request across the proxy-wide limits and one candidate key's limits, as one
-- atomic step. Mirrors core/limiter.py: sliding logs, half-open windows (an entry at t counts
-- while t <= now < t + length), concurrency slots; plus leases and shared cooldowns and cursors.
-- Time is Redis's own (TIME), in milliseconds, so the callers' clocks do not matter.
--
-- ARGV[1]: JSON {p, id, tokens, lease, scope, global, keys, cursor}; a scope spec is
--   {name, windows = [[limit_name, limit, length_ms, is_token], ...], conc (0: none)}; each
--   key also has fp and idx (its place in the pool). cursor: {pool, n, mode, pinned} or absent.
-- Returns {1, fp, now} when admitted, or {0, possible, retry_ms, now, exhausted_json}
-- (retry_ms: "-1" when only a release can help).

local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local P = a.p
local INF = math.huge

local function wkey(scope, name) return P .. ':w:' .. scope .. ':' .. name end

local function prune(scope, w)
  local k = wkey(scope, w[1])
  local cut = now - w[3]
  if w[4] == 1 then
    local old = redis.call('ZRANGEBYSCORE', k, '-inf', cut)
    if #old > 0 then
      local amounts = redis.call('HMGET', k .. ':a', unpack(old))
      local gone = 0
      for _, v in ipairs(amounts) do gone = gone + (tonumber(v) or 0) end
      redis.call('HDEL', k .. ':a', unpack(old))
      redis.call('DECRBY', k .. ':u', gone)
    end
  end
  redis.call('ZREMRANGEBYSCORE', k, '-inf', cut)
end

local function used(scope, w)
  local k = wkey(scope, w[1])
  if w[4] == 1 then return tonumber(redis.call('GET', k .. ':u') or '0') end
  return redis.call('ZCARD', k)
end

-- Earliest time >= now at which `cost` more fits if nothing is added; INF if never.
local function fit_time(scope, w, cost)
  local limit = w[2]
  if cost > limit then return INF end
  local k = wkey(scope, w[1])
  local excess = used(scope, w) + cost - limit
  if excess <= 0 then return now end
  if w[4] == 0 then
    local e = redis.call('ZRANGE', k, excess - 1, excess - 1, 'WITHSCORES')
    return tonumber(e[2]) + w[3]
  end
  local entries = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    excess = excess - (tonumber(redis.call('HGET', k .. ':a', entries[i])) or 0)
    if excess <= 0 then return tonumber(entries[i + 1]) + w[3] end
  end
  return now
end

local function in_flight(scope)
  local k = P .. ':c:' .. scope
  redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
  return redis.call('ZCARD', k)
end

-- What stops a request of `tokens` on a scope: at = now when nothing, a time, INF (never) or
-- false (only a release helps); and the exhausted limits.
local function block(spec, tokens, found)
  local latest, any = now, false
  for _, w in ipairs(spec.windows) do
    prune(spec.name, w)
    local cost = tokens
    if w[4] == 0 then cost = 1 end
    local at = fit_time(spec.name, w, cost)
    if at > now then
      any = true
      local free = at
      if at == INF then free = false end
      found[#found + 1] = {spec.name, w[1], free}
      if at > latest then latest = at end
    end
  end
  if spec.conc > 0 and in_flight(spec.name) >= spec.conc then
    found[#found + 1] = {spec.name, 'concurrency', false}
    if latest == INF then return INF end
    return false
  end
  if any then return latest end
  return now
end

local function reserve(spec, tokens)
  for _, w in ipairs(spec.windows) do
    local k = wkey(spec.name, w[1])
    redis.call('ZADD', k, now, a.id)
    if w[4] == 1 then
      redis.call('HSET', k .. ':a', a.id, tokens)
      redis.call('INCRBY', k .. ':u', tokens)
      redis.call('PEXPIRE', k .. ':a', math.ceil(w[3]) + 60000)
      redis.call('PEXPIRE', k .. ':u', math.ceil(w[3]) + 60000)
    end
    redis.call('PEXPIRE', k, math.ceil(w[3]) + 60000)
  end
  if spec.conc > 0 then
    local k = P .. ':c:' .. spec.name
    redis.call('ZADD', k, now + a.lease, a.id)
    redis.call('PEXPIRE', k, a.lease + 60000)
  end
end

-- Candidates in the shared cursor's order (the first stays first when pinned by affinity).
local keys = a.keys
if a.cursor and #keys > 1 then
  local c = tonumber(redis.call('GET', P .. ':rr:' .. a.cursor.pool) or '-1')
  if c >= 0 then
    local n = a.cursor.n
    local first = 1
    if a.cursor.pinned == 1 then first = 2 end
    local rest = {}
    for i = first, #keys do rest[#rest + 1] = keys[i] end
    table.sort(rest, function(x, y) return (x.idx - c) % n < (y.idx - c) % n end)
    for i, k in ipairs(rest) do keys[first + i - 1] = k end
  end
end

local found = {}
local gat = block(a.global, a.tokens, found)
local cooled_at = INF
local live = {}
for _, k in ipairs(keys) do
  local cool = redis.call('GET', P .. ':cool:' .. k.fp .. ':' .. a.scope)
  if cool and (cool == 'inf' or tonumber(cool) > now) then
    if cool ~= 'inf' and tonumber(cool) < cooled_at then cooled_at = tonumber(cool) end
  else
    live[#live + 1] = k
  end
end

if gat == now then
  for _, k in ipairs(live) do
    local kfound = {}
    if block(k, a.tokens, kfound) == now then
      reserve(a.global, a.tokens)
      reserve(k, a.tokens)
      if a.cursor then
        local nxt = k.idx
        if a.cursor.mode == 'rr' then nxt = (k.idx + 1) % a.cursor.n end
        redis.call('SET', P .. ':rr:' .. a.cursor.pool, nxt)
      end
      return {1, k.fp, tostring(now)}
    end
  end
end

-- Nothing fits: when could something (as core/limiter.py's _reject)?
found = {}
gat = block(a.global, a.tokens, found)
local key_at, release_helps = INF, false
for _, k in ipairs(live) do
  local at = block(k, a.tokens, found)
  if at == false then release_helps = true elseif at < key_at then key_at = at end
end
local out = cjson.encode(found)
if #live == 0 then
  local r = '-1'
  if cooled_at < INF then r = tostring(cooled_at) end
  return {0, 1, r, tostring(now), out}
end
if gat == INF or (key_at == INF and not release_helps) then
  return {0, 0, '-1', tostring(now), out}
end
if gat == false or key_at == INF then return {0, 1, '-1', tostring(now), out} end
local r = key_at
if gat > r then r = gat end
if cooled_at < r then r = math.max(cooled_at, gat) end
return {0, 1, tostring(r), tostring(now), out}
