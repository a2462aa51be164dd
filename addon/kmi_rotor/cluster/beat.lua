-- A process says it is alive. KEYS: none. ARGV: prefix, id, JSON record.
-- Returns {redis_now_ms, processes seen alive in the last minute}.
local P, id = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
redis.call('ZADD', P .. ':procs', now, id)
redis.call('HSET', P .. ':proc', id, ARGV[3])
local old = redis.call('ZRANGEBYSCORE', P .. ':procs', '-inf', now - 3600000)
if #old > 0 then
  redis.call('HDEL', P .. ':proc', unpack(old))
  redis.call('ZREMRANGEBYSCORE', P .. ':procs', '-inf', now - 3600000)
end
return {string.format('%.3f', now), redis.call('ZCOUNT', P .. ':procs', now - 60000, '+inf')}
