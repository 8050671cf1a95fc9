"""
Rendezvous kept in Redis, so that several processes (on one machine or
many) serve the same rendezvous without sticky routing.

The rules are L{MemoryStore}'s, made to hold across processes:
  - create, write and delete are each one Lua script, so atomic: of two
    writers on two nodes racing with the same If-Match, exactly one wins;
  - a rendezvous is a hash with Redis' own expiry (PX), set at creation and
    never extended; it is also judged expired on access by this node's
    clock against the Expires it was created with, so that no client is
    served past the Expires it was told;
  - the caps are counted in Redis, in sorted sets scored by expiry;
  - writes and deletes publish the id on one channel, to which each process
    holds one subscription; a process with readers parked on that id reads
    it again and answers them.  Expiry is answered by each node's own timer,
    from the time the rendezvous has left.

Poll timeouts and expiry timers run on the injected clock; connections and
their deadlines on the injected reactor.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure

from rendezvous_twisted.core.conditions import ANY, Condition
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.store import (
    Full,
    NotFound,
    PreconditionFailed,
    RendezvousError,
    StoreUnavailable,
    TooLarge,
    Version,
    Wakeup,
    new_etag,
    parking_refusal,
    retry_after,
)
from rendezvous_twisted.redis.resp import (
    RedisConnection,
    RedisDown,
    RedisProtocol,
    RedisReplyError,
    detached,
)

DEFAULT_PREFIX = "rendezvous:"
#: Each connection is PINGed every this many store timeouts, so that one
#: that went quiet is found out within one more (6 s at the defaults).
HEARTBEAT_TIMEOUTS = 5


@dataclass(frozen=True)
class StoreURL:
    """
    Where the Redis is, as C{--store} names it.
    """

    #: "tcp", "tls" or "unix".
    transport: str
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    #: A PEM file of the CA that signed the server's certificate (TLS only);
    #: None trusts the system's CAs.
    ca: str | None = None
    #: Prepended to every key and to the channel.
    prefix: str = DEFAULT_PREFIX

    def __str__(self) -> str:
        """
        The URL without its password, for logs.
        """
        if self.transport == "unix":
            return f"unix://{self.path}?db={self.db}"
        scheme = "rediss" if self.transport == "tls" else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_store_url(text: str) -> StoreURL:
    """
    Parse C{redis://[user:password@]host[:port][/db]}, C{rediss://...}
    (TLS; C{?ca=FILE} for a private CA) or C{unix:///path[?db=N]};
    C{?prefix=} and, for unix, C{?user=} and C{?password=} are accepted too.

    @raise ValueError: with a message fit for the command line.
    """
    parts = urlsplit(text)
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    known = {"prefix", "db", "user", "password", "ca"}
    unknown = set(query) - known
    if unknown:
        raise ValueError(f"--store: unknown parameter {sorted(unknown)[0]!r} in {text!r}")
    prefix = query.get("prefix", DEFAULT_PREFIX)
    if parts.scheme == "unix":
        if not parts.path or parts.netloc:
            raise ValueError(f"--store: a unix URL is unix:///absolute/path, not {text!r}")
        return StoreURL(
            "unix",
            path=unquote(parts.path),
            db=_db(query.get("db", "0"), text),
            username=query.get("user"),
            password=query.get("password"),
            prefix=prefix,
        )
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            f"--store must be memory:, redis://, rediss:// or unix:///path, not {text!r}"
        )
    if not parts.hostname:
        raise ValueError(f"--store: no host in {text!r}")
    try:
        port = parts.port or 6379
    except ValueError as e:
        raise ValueError(f"--store: {e} in {text!r}") from None
    path = parts.path.strip("/")
    if parts.scheme == "redis" and "ca" in query:
        raise ValueError("--store: ca= applies to rediss:// only")
    if "user" in query:
        raise ValueError("--store: a redis:// URL names its user before the host, as user@host")
    return StoreURL(
        "tls" if parts.scheme == "rediss" else "tcp",
        host=parts.hostname,
        port=port,
        db=_db(path or query.get("db", "0"), text),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else query.get("password"),
        ca=query.get("ca"),
        prefix=prefix,
    )


def _db(value: str, text: str) -> int:
    if not value.isdigit():
        raise ValueError(f"--store: the database is a number, not {value!r} in {text!r}")
    return int(value)


def store_endpoint(reactor: Any, url: StoreURL, timeout_seconds: float) -> IStreamClientEndpoint:
    """
    The client endpoint that reaches C{url}.
    """
    timeout = max(1, math.ceil(timeout_seconds))
    if url.transport == "unix":
        return UNIXClientEndpoint(reactor, url.path, timeout=timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=timeout)
    if url.transport == "tls":
        if url.ca is None:
            trust = platformTrust()
        else:
            with open(url.ca, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(optionsForClientTLS(url.host, trustRoot=trust), endpoint)
    return endpoint


# The scripts.  Their first line (Redis 7) has Redis check its maxmemory
# before a script runs: without it, a script whose first write frees memory
# (ZREMRANGEBYSCORE) runs whole past the limit.  A delete, which frees
# memory, may run there.  Times are milliseconds on the writer's clock.  A record is a
# hash: b body, t content type, e ETag, m last modified, x expires, o owner.

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


class _Script:
    """
    A Lua script run by its SHA1, sent whole the first time Redis does not
    know it (after a restart or a SCRIPT FLUSH).
    """

    def __init__(self, source: str) -> None:
        import hashlib

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


_SCRIPTS = {
    "create": _Script(_CREATE),
    "read": _Script(_READ),
    "write": _Script(_WRITE),
    "delete": _Script(_DELETE),
}


class _Connections(MultiService):
    """
    The store's two connections, as a service.
    """

    log = Logger()

    def __init__(self, url: StoreURL) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._url = url

    def startService(self) -> None:
        self.log.info("rendezvous are kept in Redis at {url}", url=str(self._url))
        super().startService()  # type: ignore[no-untyped-call]


class _Waiter:
    """
    One parked reader.  C{version} is None until its first read answers.
    """

    __slots__ = ("condition", "deadline", "deferred", "timer", "version")

    def __init__(self, condition: Condition, deadline: float) -> None:
        self.condition = condition
        self.deadline = deadline
        self.deferred: Deferred[Wakeup] | None = None
        self.version: Version | None = None
        self.timer: IDelayedCall | None = None


def _first_error(failure: Failure) -> Failure:
    """
    The failure of the command that failed a C{DeferredList}.
    """
    assert isinstance(failure.value, FirstError)
    return failure.value.subFailure


#: At most one warning per this many seconds while the store is unavailable.
_WARN_EVERY_SECONDS = 10.0


def _woken(waiter: _Waiter, version: Version) -> bool:
    """
    Whether C{version} answers a parked reader: it is another write than
    the one the reader was parked on (a write wakes every reader, those
    with C{If-None-Match: *} too), or one its condition does not match.
    """
    seen = waiter.version
    if seen is not None and version.etag != seen.etag:
        return True
    return not waiter.condition.matches_weak(version.etag)


class RedisStore:
    """
    Rendezvous kept in Redis: the store for several processes.

    Each process keeps two connections: one for commands, one subscribed
    to the store's channel.  While either is down, operations that need it
    fail at once with L{StoreUnavailable} (a 503); both come back by
    themselves.  Counters are this process' own; C{rendezvous_count} is the
    count across all processes as this one last saw it.
    """

    log = Logger()

    def __init__(self, config: Config, clock: IReactorTime, reactor: Any, url: StoreURL) -> None:
        self._config = config
        self._clock = clock
        self._url = url
        self.max_bytes = config.max_bytes
        prefix = url.prefix
        self._live_key = f"{prefix}live"
        self._owner_prefix = f"{prefix}owner:"
        self._record_prefix = f"{prefix}r:"
        # Channels span databases: name the database so two stores in one
        # Redis never hear each other.
        self._channel = f"{prefix}{url.db}:changed"
        self._waiting: dict[str, dict[_Waiter, None]] = {}
        # Ids being read again after a change, and those changed once more
        # while that read was out.
        self._refreshing: dict[str, bool] = {}
        self._parked = 0
        self._stopped = False
        self.created_total = 0
        self.deleted_total = 0
        self.expired_total = 0
        self._live_seen = 0
        self._ready: list[Deferred[None]] = []
        self._last_warning = -math.inf
        timeout = config.store_timeout_seconds
        heartbeat = HEARTBEAT_TIMEOUTS * timeout
        endpoint = store_endpoint(reactor, url, timeout)
        self._commands = RedisConnection(
            endpoint,
            reactor,
            timeout,
            self._select,
            on_up=self._commands_up,
            name="commands",
            heartbeat_seconds=heartbeat,
        )
        self._events = RedisConnection(
            endpoint,
            reactor,
            timeout,
            self._subscribe,
            on_message=self._changed,
            on_up=self._up,
            on_down=self._events_lost,
            name="events",
            heartbeat_seconds=heartbeat,
        )
        #: Start it to connect (and keep reconnecting); stop it to disconnect.
        self.service = _Connections(url)
        self._commands.service.setServiceParent(self.service)
        self._events.service.setServiceParent(self.service)

    # Connections.

    def connect(self) -> None:
        """
        Start connecting, and reconnecting whenever a connection is lost.
        """
        self.service.startService()

    def ready(self) -> Deferred[None]:
        """
        Fires once both connections are up.
        """
        if self.available:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._ready.append(d)
        return d

    def close(self) -> Deferred[None]:
        """
        Disconnect, and stop reconnecting.
        """
        d: Deferred[None] = self.service.stopService()  # type: ignore[no-untyped-call]
        return d

    @property
    def available(self) -> bool:
        """
        Whether both connections are up.
        """
        return self._commands.up and self._events.up

    def _authenticate(self, protocol: RedisProtocol) -> Deferred[Any]:
        url = self._url
        if url.password is None:
            return succeed(None)
        if url.username is None:
            return protocol.execute(b"AUTH", url.password)
        return protocol.execute(b"AUTH", url.username, url.password)

    def _select(self, protocol: RedisProtocol) -> Deferred[Any]:
        d = self._authenticate(protocol)
        if self._url.db:
            d.addCallback(lambda _: protocol.execute(b"SELECT", self._url.db))
        return d

    def _subscribe(self, protocol: RedisProtocol) -> Deferred[Any]:
        return self._authenticate(protocol).addCallback(
            lambda _: protocol.execute(b"SUBSCRIBE", self._channel)
        )

    def _commands_up(self) -> None:
        self._check_version()
        self._check_persistence()
        self._up()

    def _check_version(self) -> None:
        """
        Log an error if this Redis is older than 7.0, whose scripts
        (declared with a first line of flags) older ones cannot load.
        """

        def version(info: bytes) -> None:
            for line in info.splitlines():
                if line.startswith(b"redis_version:"):
                    found = line.partition(b":")[2].decode("ascii", "replace")
                    major = found.partition(".")[0]
                    if major.isdigit() and int(major) < 7:
                        self.log.error(
                            "Redis at {url} is version {version}: 7.0 or newer is needed, "
                            "and until then creates, writes and deletes fail (503)",
                            url=str(self._url),
                            version=found,
                        )

        # INFO may well not be granted (docs/scaling.md's ACL user): then the scripts'
        # own errors tell.
        self._commands.execute(b"INFO", b"server").addCallbacks(version, lambda _: None)

    def _check_persistence(self) -> None:
        """
        Warn if this Redis writes its data to disk: payloads must live in
        memory only (docs/scaling.md, "Redis settings").
        """

        def persists(replies: list[Any]) -> None:
            [(_, save), (_, appendonly)] = replies
            settings = dict(zip(save[::2], save[1::2], strict=True))
            settings.update(zip(appendonly[::2], appendonly[1::2], strict=True))
            if settings.get(b"save") or settings.get(b"appendonly") == b"yes":
                self.log.warn(
                    "Redis at {url} writes its data to disk (save {save!r}, appendonly "
                    '{appendonly!r}), payloads included; set save "" and appendonly no',
                    url=str(self._url),
                    save=settings.get(b"save", b"").decode("ascii", "replace"),
                    appendonly=settings.get(b"appendonly", b"").decode("ascii", "replace"),
                )

        def unknown(failure: Failure) -> None:
            self.log.info(
                "could not check whether Redis writes to disk ({error}); it must not",
                error=_first_error(failure).getErrorMessage(),
            )

        checks = [
            self._commands.execute(b"CONFIG", b"GET", b"save"),
            self._commands.execute(b"CONFIG", b"GET", b"appendonly"),
        ]
        DeferredList(checks, fireOnOneErrback=True, consumeErrors=True).addCallbacks(
            persists, unknown
        )

    def _up(self) -> None:
        if self.available:
            ready, self._ready = self._ready, []
            for d in ready:
                d.callback(None)

    def _events_lost(self) -> None:
        # Changes published while we are not subscribed are lost to us, so
        # no parked reader can trust it will be woken: answer them all.
        for rendezvous_id in list(self._waiting):
            self._answer_all(rendezvous_id, Failure(StoreUnavailable("lost the store's events")))

    def _script(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        return self._unavailable(_SCRIPTS[script].run(self._commands, keys, args))

    def _command(self, *arguments: bytes | str | int) -> Deferred[Any]:
        return self._unavailable(self._commands.execute(*arguments))

    def _unavailable(self, d: Deferred[Any]) -> Deferred[Any]:
        """
        Turn Redis' failures into L{StoreUnavailable}.
        """

        def down(failure: Failure) -> Failure:
            if not failure.check(RedisDown, RedisReplyError):
                return failure
            # One line per outage, not one per request.
            now = self._clock.seconds()
            if now - self._last_warning >= _WARN_EVERY_SECONDS:
                self._last_warning = now
                self.log.warn("the store is unavailable: {error}", error=failure.getErrorMessage())
            return Failure(StoreUnavailable(failure.getErrorMessage()))

        return d.addErrback(down)

    # Introspection.

    @property
    def rendezvous_count(self) -> int:
        """
        Rendezvous alive across every process, when this one last created.
        """
        return self._live_seen

    @property
    def parked_count(self) -> int:
        """
        How many readers are parked on this process.
        """
        return self._parked

    # The operations.

    def _now_ms(self) -> int:
        # Down, not to the nearest: a rendezvous is never judged expired early.
        return math.floor(self._clock.seconds() * 1000)

    def _key(self, rendezvous_id: str) -> str:
        return self._record_prefix + rendezvous_id

    def create(self, body: bytes, content_type: bytes, owner: str) -> Deferred[Version]:
        if len(body) > self.max_bytes:
            return fail(TooLarge())
        now = self._now_ms()
        ttl = round(self._config.ttl_seconds * 1000)
        rendezvous_id = secrets.token_urlsafe(16)
        etag = new_etag()
        d = self._script(
            "create",
            [self._live_key, self._owner_prefix + owner, self._key(rendezvous_id)],
            [
                now,
                now + ttl,
                ttl,
                self._config.max_rendezvous,
                self._config.max_rendezvous_per_address,
                body,
                content_type,
                etag,
                owner,
                rendezvous_id,
            ],
        )

        def created(reply: list[Any]) -> Deferred[Version] | Version:
            outcome, detail, expired = reply
            self.expired_total += expired
            if outcome == b"ok":
                self.created_total += 1
                self._live_seen = detail
                return Version(
                    rendezvous_id, body, content_type, etag, now / 1000, (now + ttl) / 1000
                )
            if outcome == b"exists":  # pragma: no cover - 2**-128
                return self.create(body, content_type, owner)
            seconds = retry_after(float(detail) / 1000 - now / 1000)
            if outcome == b"owner":
                raise Full("too many rendezvous from this address", seconds)
            raise Full("the server is full", seconds)

        # Detached: Redis runs a script once sent, and what its answer
        # changes here, the counts, must change even if the client hung up.
        return detached(d.addCallback(created))

    def _version(self, rendezvous_id: str, fields: list[Any]) -> tuple[Version, float]:
        """
        A Version from a record's fields, and the seconds Redis keeps it.
        """
        body, content_type, etag, modified, expires, pttl = fields
        version = Version(
            rendezvous_id, body, content_type, etag, int(modified) / 1000, int(expires) / 1000
        )
        return version, pttl / 1000

    def _read(self, rendezvous_id: str) -> Deferred[tuple[Version, float]]:
        d = self._script("read", [self._key(rendezvous_id)], [self._now_ms()])

        def found(fields: list[Any] | None) -> tuple[Version, float]:
            if fields is None:
                raise NotFound()
            return self._version(rendezvous_id, fields)

        return d.addCallback(found)

    def read(self, rendezvous_id: str) -> Deferred[Version]:
        return self._read(rendezvous_id).addCallback(lambda found: found[0])

    def write(
        self, rendezvous_id: str, body: bytes, content_type: bytes, if_match: Condition = ANY
    ) -> Deferred[Version]:
        now = self._now_ms()
        too_large = len(body) > self.max_bytes
        etag = new_etag()
        d = self._script(
            "write",
            [self._key(rendezvous_id)],
            [
                now,
                b"1" if if_match.any else b"0",
                b"1" if too_large else b"0",
                b"" if too_large else body,
                content_type,
                etag,
                self._channel,
                rendezvous_id,
                *sorted(if_match.strong),
            ],
        )

        def written(reply: list[Any]) -> Version:
            outcome = reply[0]
            if outcome == b"ok":
                return Version(
                    rendezvous_id, body, content_type, etag, now / 1000, int(reply[1]) / 1000
                )
            if outcome == b"pf":
                raise PreconditionFailed(self._version(rendezvous_id, reply[1])[0])
            if outcome == b"tl":
                raise TooLarge()
            raise NotFound()

        return d.addCallback(written)

    def delete(self, rendezvous_id: str) -> Deferred[None]:
        d = self._script(
            "delete",
            [self._key(rendezvous_id), self._live_key],
            [self._now_ms(), self._channel, rendezvous_id, self._owner_prefix],
        )

        def deleted(existed: int) -> None:
            if not existed:
                raise NotFound()
            self.deleted_total += 1

        return detached(d.addCallback(deleted))

    def wait_for_change(
        self, rendezvous_id: str, if_none_match: Condition, timeout_seconds: float
    ) -> Deferred[Wakeup]:
        if timeout_seconds <= 0 or self._stopped:
            return self.read(rendezvous_id).addCallback(
                lambda version: Wakeup(version, not if_none_match.matches_weak(version.etag))
            )
        refusal: RendezvousError | None
        if not self._events.up:
            # Nobody could wake a parked reader.
            refusal = StoreUnavailable("not subscribed to the store's events")
        else:
            refusal = parking_refusal(
                self._config,
                self._waiting.get(rendezvous_id, {}),
                self._parked,
                self._clock.seconds(),
            )
        if refusal is not None:
            # Only a wait is refused: a reader that would not park (a change
            # it has not seen, a rendezvous gone) is answered, as in memory.
            def unparked(version: Version) -> Wakeup:
                if if_none_match.matches_weak(version.etag):
                    raise refusal
                return Wakeup(version, changed=True)

            return self.read(rendezvous_id).addCallback(unparked)
        # Parked before it reads: a change published while the read is out
        # reads again (see _changed), so that no wake-up falls in between.
        waiter = _Waiter(if_none_match, self._clock.seconds() + timeout_seconds)
        self._waiting.setdefault(rendezvous_id, {})[waiter] = None
        self._parked += 1

        def cancel(d: Deferred[Wakeup]) -> None:
            # The client hung up: forget it now, not when its timer is due.
            self._unpark(rendezvous_id, waiter)

        d: Deferred[Wakeup] = Deferred(cancel)
        waiter.deferred = d
        self._read(rendezvous_id).addBoth(self._first_read, rendezvous_id, waiter, timeout_seconds)
        return d

    def shutdown(self) -> None:
        self._stopped = True
        for rendezvous_id, waiters in list(self._waiting.items()):
            for waiter in list(waiters):
                if waiter.version is not None:
                    self._settle(rendezvous_id, waiter, Wakeup(waiter.version, changed=False))

    # Parking.

    def _first_read(
        self,
        found: tuple[Version, float] | Failure,
        rendezvous_id: str,
        waiter: _Waiter,
        timeout_seconds: float,
    ) -> None:
        if waiter not in self._waiting.get(rendezvous_id, ()):
            return  # answered (by a change or shutdown) or gone meanwhile
        if isinstance(found, Failure):
            self._settle(rendezvous_id, waiter, found)
            return
        version, kept_seconds = found
        if not waiter.condition.matches_weak(version.etag):
            self._settle(rendezvous_id, waiter, Wakeup(version, changed=True))
            return
        if self._stopped:
            self._settle(rendezvous_id, waiter, Wakeup(version, changed=False))
            return
        waiter.version = version
        now = self._clock.seconds()
        remaining = min(version.expires - now, kept_seconds)
        waiter.deadline = now + min(timeout_seconds, remaining)
        if timeout_seconds < remaining:
            waiter.timer = self._clock.callLater(
                timeout_seconds, self._settle, rendezvous_id, waiter, None
            )
        else:
            # The rendezvous expires first: answer as its expiry would.
            waiter.timer = self._clock.callLater(
                remaining, self._settle, rendezvous_id, waiter, Failure(NotFound())
            )

    def _unpark(self, rendezvous_id: str, waiter: _Waiter) -> bool:
        waiters = self._waiting.get(rendezvous_id)
        if waiters is None or waiter not in waiters:
            return False
        del waiters[waiter]
        if not waiters:
            del self._waiting[rendezvous_id]
        self._parked -= 1
        if waiter.timer is not None and waiter.timer.active():
            waiter.timer.cancel()
        return True

    def _settle(self, rendezvous_id: str, waiter: _Waiter, result: Wakeup | Failure | None) -> None:
        """
        Answer one parked reader, if still parked: with C{result}, or with
        its unchanged version when C{result} is None (its poll timed out).
        """
        if not self._unpark(rendezvous_id, waiter):
            return
        assert waiter.deferred is not None
        if result is None:
            assert waiter.version is not None
            result = Wakeup(waiter.version, changed=False)
        if isinstance(result, Failure):
            waiter.deferred.errback(result)
        else:
            waiter.deferred.callback(result)

    def _answer_all(self, rendezvous_id: str, result: Failure) -> None:
        for waiter in list(self._waiting.get(rendezvous_id, ())):
            self._settle(rendezvous_id, waiter, result)

    def _changed(self, channel: bytes, message: bytes) -> None:
        """
        A write or delete somewhere published an id: read it again if
        anyone here waits on it.
        """
        rendezvous_id = message.decode("ascii", "replace")
        if rendezvous_id not in self._waiting:
            return
        if rendezvous_id in self._refreshing:
            self._refreshing[rendezvous_id] = True  # read again after this one
            return
        self._refresh(rendezvous_id)

    def _refresh(self, rendezvous_id: str) -> None:
        self._refreshing[rendezvous_id] = False

        def settled(found: tuple[Version, float] | Failure) -> None:
            again = self._refreshing.pop(rendezvous_id)
            for waiter in list(self._waiting.get(rendezvous_id, ())):
                if isinstance(found, Failure):
                    self._settle(rendezvous_id, waiter, found)
                elif _woken(waiter, found[0]):
                    self._settle(rendezvous_id, waiter, Wakeup(found[0], changed=True))
            if again and rendezvous_id in self._waiting:
                self._refresh(rendezvous_id)

        self._read(rendezvous_id).addBoth(settled)
