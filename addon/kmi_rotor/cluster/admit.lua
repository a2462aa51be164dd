-- Admission of one request across the proxy-wide limits and one candidate key's limits, as one
-- atomic step. Mirrors core/limiter.py: sliding logs, half-open windows (an entry at t counts
-- while t <= now < t + length), concurrency slots; plus leases and shared cooldowns and cursors.
-- Time is Redis's own (TIME), in milliseconds, so the callers' clocks do not matter.
--
-- Provider budgets (core/budget.py's Budget, per key and scope): what the provider last
-- reported of each window, and the requests sent since that it may not have counted; a key
-- whose budget is spent is skipped until the budget frees, as a cooldown is.
--
-- ARGV[1]: JSON {p, id, tokens, lease, scope, global, keys, cursor, order}; a scope spec is
--   {name, windows = [[limit_name, limit, length_ms, is_token], ...], conc (0: none)}; each
--   key also has fp, idx (its place in the pool) and hh (its headroom in what is not shared).
--   cursor: {pool, n, mode, pinned, span} or absent. order: "headroom" sorts the keys by headroom.
-- Returns {1, fp, now, member (its place among the key's requests in flight)} when admitted,
-- {0, possible, retry_ms, now, exhausted_json} (retry_ms: "-1" when only a release helps)
-- when not, or {2, cursor} when the cursor is outside the keys sent (cursor.span, below).

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

-- Budgets: a hash of window name -> {l (limit, -1 unknown), r (remaining), reset, seen,
-- longest, guard, cap} in ms of Redis's clock; the requests sent since, a sorted set each.
local function bhash(fp) return P .. ':b:' .. fp .. ':' .. a.scope end
local function bsent(fp, name) return P .. ':bs:' .. fp .. ':' .. a.scope .. ':' .. name end
local function period(b) return math.max(1000, b.longest, b.reset - b.seen) end
local function free_at(b) return math.min(b.reset, b.seen + b.cap) + b.guard end
local function after(t) return string.format('(%.3f', t) end

local function budgets(fp)
  local raw = redis.call('HGETALL', bhash(fp))
  local out = {}
  for i = 1, #raw, 2 do out[#out + 1] = {raw[i], cjson.decode(raw[i + 1])} end
  return out
end

-- Requests sent to probe a report that no longer binds, within the probe interval.
local function probes(k, b)
  local lo, cut = free_at(b), now - math.min(period(b), b.cap) - b.guard
  if lo > cut then return redis.call('ZCOUNT', k, string.format('%.3f', lo), '+inf') end
  return redis.call('ZCOUNT', k, after(cut), '+inf')
end

local function sliding(b) return b.l >= 1 and now >= b.reset + b.guard end

-- Requests the key can still take (Budget.left).
local function left(k, b)
  if now < free_at(b) then return b.r - redis.call('ZCARD', k) end
  if sliding(b) then
    return math.floor(b.l) - redis.call('ZCOUNT', k, after(now - period(b) - b.guard), '+inf')
  end
  if b.l < 0 and now >= b.reset + b.guard then return INF end
  return 1 - probes(k, b)
end

-- When a spent budget frees (Budget.blocked_until); nil when it is not spent.
local function spent_until(k, b)
  if left(k, b) > 0 then return nil end
  if now < free_at(b) then return free_at(b) end
  if sliding(b) then
    local cut = after(now - period(b) - b.guard)
    local n = redis.call('ZCOUNT', k, cut, '+inf')
    local e = redis.call('ZRANGEBYSCORE', k, cut, '+inf', 'WITHSCORES', 'LIMIT',
      n - math.floor(b.l), 1)
    return tonumber(e[2]) + period(b) + b.guard
  end
  local e = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  return tonumber(e[2]) + math.min(period(b), b.cap) + b.guard
end

-- The latest time any spent budget of the key frees; nil when none is spent.
local function spent(fp, bs)
  local latest = nil
  for _, nb in ipairs(bs) do
    local at = spent_until(bsent(fp, nb[1]), nb[2])
    if at and (latest == nil or at > latest) then latest = at end
  end
  return latest
end

local function fraction(fp, bs)
  local f = 1.0
  for _, nb in ipairs(bs) do
    local b = nb[2]
    if b.l > 0 then
      f = math.min(f, math.max(0.0, math.min(1.0, left(bsent(fp, nb[1]), b) / b.l)))
    end
  end
  return f
end

-- The request counts in every budget of the key (older entries drop once the report's
-- reset is past, as Budgets.admitted), and among the key's requests in flight, which the
-- key's next report counts as sent; a key without a budget (none reported, or its limits
-- paced here) skips both. Returns its place in flight ("" when none).
local function spend(fp, bs)
  if #bs == 0 then return '' end
  local ttl = redis.call('PTTL', bhash(fp))
  for _, nb in ipairs(bs) do
    local k, b = bsent(fp, nb[1]), nb[2]
    local cut = now - period(b) - b.guard
    if now >= b.reset then redis.call('ZREMRANGEBYSCORE', k, '-inf', string.format('%.3f', cut)) end
    redis.call('ZADD', k, now, a.id)
    if ttl > 0 then redis.call('PEXPIRE', k, ttl) end
  end
  local f = P .. ':fl:' .. fp .. ':' .. a.scope
  local member = a.id .. '@' .. string.format('%.3f', now)
  -- Places whose lease ended (a process that died) are dropped by the next report.
  redis.call('ZADD', f, now + a.lease, member)
  redis.call('PEXPIRE', f, math.ceil(a.lease) + 60000)
  return member
end

-- Candidates in the shared cursor's order (the first stays first when pinned by affinity).
-- cursor.span: the keys (after a pinned one) are a run of the pool in cyclic order, not all
-- of its usable keys; when the cursor is not within the run, the caller's view of it is out
-- of date: {2, cursor} tells it where to begin again.
local keys = a.keys
if a.cursor and #keys > 1 then
  local c = tonumber(redis.call('GET', P .. ':rr:' .. a.cursor.pool) or '-1')
  if c >= 0 then
    local n = a.cursor.n
    local first = 1
    if a.cursor.pinned == 1 then first = 2 end
    if a.cursor.span == 1 and #keys >= first then
      local from = keys[first].idx
      if (c - from) % n > (keys[#keys].idx - from) % n then return {2, tostring(c)} end
    end
    local rest = {}
    for i = first, #keys do rest[#rest + 1] = keys[i] end
    table.sort(rest, function(x, y) return (x.idx - c) % n < (y.idx - c) % n end)
    for i, k in ipairs(rest) do keys[first + i - 1] = k end
  end
end

local found = {}
local gat = block(a.global, a.tokens, found)
local cooled_at = INF
local live, spent_keys = {}, {}

-- Whether the key may take a request: not cooling, no provider budget of it spent.
local function examine(k)
  local cool = redis.call('GET', P .. ':cool:' .. k.fp .. ':' .. a.scope)
  if cool and (cool == 'inf' or tonumber(cool) > now) then
    if cool ~= 'inf' and tonumber(cool) < cooled_at then cooled_at = tonumber(cool) end
    return false
  end
  k.budgets = budgets(k.fp)
  local until_ = spent(k.fp, k.budgets)
  if until_ then
    if until_ < cooled_at then cooled_at = until_ end
    spent_keys[#spent_keys + 1] = {'key:' .. k.fp, 'provider_budget', until_}
    return false
  end
  live[#live + 1] = k
  return true
end

-- Reserve on the key if it has room; the answer to return, or nil.
local function take(k)
  if gat ~= now or block(k, a.tokens, {}) ~= now then return nil end
  reserve(a.global, a.tokens)
  reserve(k, a.tokens)
  local member = spend(k.fp, k.budgets)
  if a.cursor then
    local nxt = k.idx
    if a.cursor.mode == 'rr' then nxt = (k.idx + 1) % a.cursor.n end
    redis.call('SET', P .. ':rr:' .. a.cursor.pool, nxt)
  end
  return {1, k.fp, tostring(now), member}
end

if a.order == 'headroom' then
  -- Most headroom first (ties keep the cursor's order), as the shared windows and budgets
  -- have it; an affinity's key stays first.
  for _, k in ipairs(keys) do examine(k) end
  if #live > 1 then
    local first = 1
    if a.cursor and a.cursor.pinned == 1 and live[1] == keys[1] then first = 2 end
    local rest = {}
    for i = first, #live do
      local k = live[i]
      local h = math.min(k.hh or 1.0, fraction(k.fp, k.budgets))
      for _, w in ipairs(k.windows) do
        prune(k.name, w)
        h = math.min(h, (w[2] - used(k.name, w)) / w[2])
      end
      if k.conc > 0 then h = math.min(h, (k.conc - in_flight(k.name)) / k.conc) end
      rest[#rest + 1] = {k = k, h = math.floor(math.max(0.0, h) * 1000 + 0.5), i = i}
    end
    table.sort(rest, function(x, y)
      if x.h ~= y.h then return x.h > y.h end
      return x.i < y.i
    end)
    for j, r in ipairs(rest) do live[first + j - 1] = r.k end
  end
  for _, k in ipairs(live) do
    local got = take(k)
    if got then return got end
  end
else
  -- In order, looking no further than the first key that takes it.
  for _, k in ipairs(keys) do
    if examine(k) then
      local got = take(k)
      if got then return got end
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
for _, e in ipairs(spent_keys) do found[#found + 1] = e end
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
