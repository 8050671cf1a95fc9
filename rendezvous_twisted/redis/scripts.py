"""
The Lua scripts that make each of the Redis store's writes one atomic step,
and how they are run.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from rendezvous_twisted.redis.resp import RedisConnection, RedisReplyError

# Their first line (Redis 7) has Redis check its maxmemory
# before a script runs: without it, a script whose first write frees memory
# (ZREMRANGEBYSCORE) runs whole past the limit.  A delete, which frees
# memory, may run there.  Times are milliseconds on the writer's clock.  A record is a
# hash: b body, t content type, e ETag, m last modified, x expires, o owner;
# and once a send recorded one, n the count of its transactions and, for
# each, t:<transaction id> the ETag it wrote (empty for a conflict).  They
# live in the record so that its expiry and its DEL take them along.

#: KEYS: live set, owner's set, record.  ARGV: now, expires, ttl, max
#: rendezvous, max per owner, body, type, ETag, owner, id.
_CREATE = """#!lua
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then
  return {'owner', redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')[2], expired}
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return {'full', redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2], expired}
end
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {'exists', '0', expired}
end
redis.call('HSET', KEYS[3], 'b', ARGV[6], 't', ARGV[7], 'e', ARGV[8], 'm', ARGV[1],
           'x', ARGV[2], 'o', ARGV[9])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[10])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[10])
-- The sets live as long as their longest-lived member: only ever extended,
-- should processes run with different TTLs.
for i = 1, 2 do
  if redis.call('PTTL', KEYS[i]) < tonumber(ARGV[3]) then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  end
end
return {'ok', redis.call('ZCARD', KEYS[1]), expired}
"""

#: KEYS: record.  ARGV: now.  Nil, or the fields and the PTTL.  It only
#: reads, and says so: Redis runs it at its maxmemory too, and on replicas.
_READ = """#!lua flags=no-writes
local v = redis.call('HMGET', KEYS[1], 'b', 't', 'e', 'm', 'x')
if not v[1] or tonumber(v[5]) <= tonumber(ARGV[1]) then
  return false
end
v[6] = redis.call('PTTL', KEYS[1])
return v
"""

#: KEYS: record.  ARGV: now, "1" if any ETag matches, "1" if the body is
#: too large, body, type, new ETag, channel, id, then the strong ETags.
_WRITE = """#!lua
local v = redis.call('HMGET', KEYS[1], 'b', 't', 'e', 'm', 'x')
if not v[1] or tonumber(v[5]) <= tonumber(ARGV[1]) then
  return {'nf'}
end
if ARGV[2] ~= '1' then
  local matched = false
  for i = 9, #ARGV do
    if ARGV[i] == v[3] then matched = true break end
  end
  if not matched then
    v[6] = redis.call('PTTL', KEYS[1])
    return {'pf', v}
  end
end
if ARGV[3] == '1' then
  return {'tl'}
end
redis.call('HSET', KEYS[1], 'b', ARGV[4], 't', ARGV[5], 'e', ARGV[6], 'm', ARGV[1])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok', v[5], redis.call('PTTL', KEYS[1])}
"""

#: KEYS: record.  ARGV: now, "1" if any ETag matches, "1" if the body is
#: too large, body, type, new ETag, channel, id, the transaction's field,
#: the most transactions a record keeps, then the strong ETags.  The order
#: is the memory store's: gone, replay (the recorded ETag, or an empty one
#: for a conflict), too many, conflict (recorded), too large (not), write
#: (recorded, and published as a write is).
_SEND = """#!lua
local v = redis.call('HMGET', KEYS[1], 'x', 'e', ARGV[9], 'n')
if not v[1] or tonumber(v[1]) <= tonumber(ARGV[1]) then
  return {'nf'}
end
if v[3] then
  return {'replay', v[3]}
end
local count = tonumber(v[4] or '0')
if count >= tonumber(ARGV[10]) then
  return {'many'}
end
if ARGV[2] ~= '1' then
  local matched = false
  for i = 11, #ARGV do
    if ARGV[i] == v[2] then matched = true break end
  end
  if not matched then
    redis.call('HSET', KEYS[1], ARGV[9], '', 'n', count + 1)
    return {'conflict'}
  end
end
if ARGV[3] == '1' then
  return {'tl'}
end
redis.call('HSET', KEYS[1], 'b', ARGV[4], 't', ARGV[5], 'e', ARGV[6], 'm', ARGV[1],
           ARGV[9], ARGV[6], 'n', count + 1)
redis.call('PUBLISH', ARGV[7], ARGV[8])
return {'ok'}
"""

#: KEYS: record, live set.  ARGV: now, channel, id, owner sets' prefix.
_DELETE = """#!lua flags=allow-oom
local v = redis.call('HMGET', KEYS[1], 'x', 'o')
if not v[1] or tonumber(v[1]) <= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', ARGV[4] .. v[2], ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


class Script:
    """
    A Lua script run by its SHA1, sent whole the first time Redis does not
    know it (after a restart or a SCRIPT FLUSH).
    """

    def __init__(self, source: str) -> None:
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source, usedforsecurity=False).hexdigest().encode("ascii")

    def run(self, redis: RedisConnection, keys: list[str], args: list[Any]) -> Deferred[Any]:
        head = [len(keys), *keys, *args]

        def unknown(failure: Failure) -> Any:
            failure.trap(RedisReplyError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return redis.execute(b"EVAL", self.source, *head)

        return redis.execute(b"EVALSHA", self.sha, *head).addErrback(unknown)


#: The store's scripts, by name.
SCRIPTS = {
    "create": Script(_CREATE),
    "read": Script(_READ),
    "write": Script(_WRITE),
    "send": Script(_SEND),
    "delete": Script(_DELETE),
}
