-- The shared windows as one process's share of them, to start its local windows from when
-- Redis goes away. ARGV[1]: JSON {p, n (processes alive), cap, scopes = [spec...]} (specs as
-- admit.lua's). Every window's live entries are taken in groups of n from the newest, each
-- group one entry at its newest time holding 1/n of the group (rounded up): a process that
-- starts from them and keeps to 1/n of the limit keeps the cluster within it. Groups are
-- merged further so that no window returns more than cap entries.
-- Returns {now, JSON {scope: {window: [[time_ms, amount]...]}}}.
local a = cjson.decode(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local n, cap = math.max(1, a.n), math.max(1, a.cap)

local function amounts(k, members, is_token)
  local out = {}
  if is_token == 0 then
    for i = 1, #members do out[i] = 1 end
    return out
  end
  for i = 1, #members, 1000 do
    local part = redis.call('HMGET', k .. ':a', unpack(members, i, math.min(#members, i + 999)))
    for j, v in ipairs(part) do out[i + j - 1] = tonumber(v) or 0 end
  end
  return out
end

local out = {}
for _, spec in ipairs(a.scopes) do
  for _, w in ipairs(spec.windows) do
    local k = a.p .. ':w:' .. spec.name .. ':' .. w[1]
    local e = redis.call('ZRANGEBYSCORE', k, string.format('(%.3f', now - w[3]), '+inf',
      'WITHSCORES')
    local count = #e / 2
    if count > 0 then
      local members, times = {}, {}
      for i = 1, count do
        members[i], times[i] = e[2 * i - 1], tonumber(e[2 * i])
      end
      local amount = amounts(k, members, w[4])
      local size = n * math.max(1, math.ceil(count / (n * cap)))
      local groups = {}
      local i = count
      while i >= 1 do
        local sum, newest = 0, times[i]
        for j = math.max(1, i - size + 1), i do sum = sum + amount[j] end
        groups[#groups + 1] = {newest, math.ceil(sum / n)}
        i = i - size
      end
      out[spec.name] = out[spec.name] or {}
      out[spec.name][w[1]] = groups
    end
  end
end
if next(out) == nil then return {string.format('%.3f', now), '{}'} end
return {string.format('%.3f', now), cjson.encode(out)}
