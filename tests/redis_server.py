"""
A real C{redis-server} for the tests: Debian's C{/usr/bin/redis-server} in a
subprocess, in a temporary folder of its own, with no persistence at all
(C{--save ''}, C{--appendonly no}: payloads never reach the disk), listening
on a free loopback TCP port and on a unix socket, optionally also with TLS.

A test can stop it, kill it, freeze it (SIGSTOP: "Redis is hung") and thaw
it, and restart it on the same port and socket.  Nothing sleeps: start()
polls with a PING over a raw socket, and between two PINGs waits a few
milliseconds for the process to exit (which is how a failed start shows).

The fixtures: C{redis_server} (one server for the whole session),
C{redis_url} (its TCP store URL, after a FLUSHALL), and C{own_redis} (a
private server that a test may stop, restart or pause).
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest

from .certificates import CA, cert_pem

REDIS_SERVER = Path("/usr/bin/redis-server")
HOST = "127.0.0.1"
#: How long start() waits for the first PONG.
START_DEADLINE_SECONDS = 10.0
#: How long stop() waits for the process to exit after SIGTERM.
STOP_DEADLINE_SECONDS = 10.0
#: How long start() waits for the process to exit between two PINGs.
POLL_SECONDS = 0.005

RespValue = Any


class RedisError(Exception):
    """
    An error reply (C{-ERR ...}) from Redis.
    """


def free_port() -> int:
    """
    A loopback TCP port nobody listens on right now.  (Someone could take
    it before Redis binds it: start() then retries with another.)
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _encode(args: tuple[bytes | str | int, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _reply(sock: socket.socket) -> RespValue:
    """
    One reply from a blocking socket, parsed by hiredis: the harness never
    depends on the client under test (rendezvous_twisted.redis.resp).
    """
    reader = hiredis.Reader(replyError=RedisError)
    reply = reader.gets()
    while reply is False:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("Redis closed the connection mid-reply")
        reader.feed(chunk)
        reply = reader.gets()
    if isinstance(reply, RedisError):
        raise reply
    return reply


def _process_state(pid: int) -> str:
    """
    The state letter of a process (R, S, T for stopped...), "" once gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return ""
    # The command name (in parentheses) may hold spaces; the state follows it.
    return stat.rpartition(")")[2].split()[0]


def terminate(proc: subprocess.Popen[bytes]) -> int:
    """
    End a process gracefully: SIGTERM (after a SIGCONT, should it be
    stopped), then SIGKILL if it is still there after a few seconds.  Its
    exit code.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=STOP_DEADLINE_SECONDS)


class RedisServer:
    """
    One C{redis-server} process of our own; see the module docstring.
    """

    def __init__(self, tls: bool = False) -> None:
        if not REDIS_SERVER.exists():
            raise RuntimeError(
                f"{REDIS_SERVER} is missing: apt-get install redis-server (as .ci/run does)"
            )
        # Short, under /tmp: a unix socket path must fit in 107 bytes, and
        # pytest's tmp_path may not.
        self.directory = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.socket_path = self.directory / "redis.sock"
        self.log_path = self.directory / "redis.log"
        self.port = 0
        self.tls_port = 0
        self.ca_path: Path | None = None
        if tls:
            ca = CA.make("redis")
            ca.write_leaf(self.directory / "tls")
            self.ca_path = self.directory / "tls" / "ca.pem"
            self.ca_path.write_bytes(cert_pem(ca.root))
        self.proc: subprocess.Popen[bytes] | None = None

    # Addresses.

    @property
    def url(self) -> str:
        """
        The store URL of the plain TCP port, database 0.
        """
        return f"redis://{HOST}:{self.port}/0"

    @property
    def unix_url(self) -> str:
        """
        The store URL of the unix socket, database 0.
        """
        return f"unix://{self.socket_path}?db=0"

    @property
    def tls_url(self) -> str:
        """
        The store URL of the TLS port (a server started with tls=True),
        trusting only this server's private CA.
        """
        assert self.ca_path is not None, "this server was not started with tls=True"
        return f"rediss://localhost:{self.tls_port}/0?ca={self.ca_path}"

    # Lifecycle.

    @property
    def running(self) -> bool:
        """
        Whether the process is alive (paused counts as alive).
        """
        return self.proc is not None and self.proc.poll() is None

    @property
    def paused(self) -> bool:
        return self.proc is not None and _process_state(self.proc.pid) == "T"

    def _args(self) -> list[str]:
        args = [
            str(REDIS_SERVER),
            "--port", str(self.port),
            # 127.0.0.1 always; ::1 too where there is one ("-": optional),
            # so that "localhost" works for the TLS URL whichever it means.
            "--bind", HOST, "-::1",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            # No persistence whatever: no RDB snapshots, no append-only file.
            "--save", "",
            "--appendonly", "no",
            # Its timer runs 100 times a second rather than 10: SIGTERM is
            # acted on in that timer, so stop() takes ~10 ms, not ~100.
            "--hz", "100",
        ]  # fmt: skip
        if self.ca_path is not None:
            tls = self.directory / "tls"
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(tls / "fullchain.pem"),
                "--tls-key-file", str(tls / "key.pem"),
                # Clients are not asked for certificates of their own.
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return args

    def start(self) -> None:
        """
        Start the process (on the ports it had, if it ran before) and wait
        until it answers PING on every address.  The first start picks free
        ports, and picks again if one was taken meanwhile.
        """
        assert not self.running, "already running"
        first = self.port == 0
        for _ in range(5 if first else 1):
            if first:
                self.port = free_port()
                self.tls_port = free_port() if self.ca_path is not None else 0
            if self._launch():
                return
            if "already in use" not in self.log():
                break
        raise RuntimeError(f"redis-server did not start; its log:\n{self.log()}")

    def _launch(self) -> bool:
        """
        Run the process and wait for its PONGs; False if it exited first.
        """
        self.log_path.write_bytes(b"")
        self.proc = subprocess.Popen(
            self._args(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a ^C meant for pytest does not stop it
            # halfway; stop() and the fixtures end it.
            start_new_session=True,
        )
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        for _ in range(100_000):
            if self.answers():
                return True
            try:
                self.proc.wait(timeout=min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            else:
                return False
            if time.monotonic() > deadline:
                break
        self.kill()
        raise TimeoutError(f"redis-server did not answer in {START_DEADLINE_SECONDS}s")

    def answers(self, timeout: float = 1.0) -> bool:
        """
        Whether every address answers PING with PONG within C{timeout}.
        """
        try:
            return all(
                self.command(b"PING", via=via, timeout=timeout) == b"PONG"
                for via in self._addresses()
            )
        except (OSError, ConnectionError, RedisError):
            return False

    def _addresses(self) -> list[str]:
        return ["tcp", "unix"] + (["tls"] if self.ca_path is not None else [])

    def stop(self) -> int:
        """
        Stop gracefully (SIGTERM; thawed first if paused) and wait for the
        exit; SIGKILL if it takes longer than a few seconds.  Its exit code.
        """
        return 0 if self.proc is None else terminate(self.proc)

    def kill(self) -> None:
        """
        Kill at once (SIGKILL), as a crash or the OOM killer would.
        """
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE_SECONDS)

    def _signal_and_wait(self, sig: int, stopped: bool) -> None:
        assert self.proc is not None and self.running, "not running"
        self.proc.send_signal(sig)
        deadline = time.monotonic() + STOP_DEADLINE_SECONDS
        for _ in range(100_000):
            if self.paused == stopped:
                return
            if time.monotonic() > deadline:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=POLL_SECONDS)
        raise AssertionError(f"redis-server did not {'stop' if stopped else 'continue'}")

    def pause(self) -> None:
        """
        Freeze the process (SIGSTOP): connections are still accepted by the
        kernel, but nothing is ever answered, as with a hung Redis.
        """
        self._signal_and_wait(signal.SIGSTOP, stopped=True)

    def resume(self) -> None:
        """
        Thaw a paused process (SIGCONT); it answers what piled up.
        """
        self._signal_and_wait(signal.SIGCONT, stopped=False)

    def restart(self) -> None:
        """
        Stop (if running) and start again on the same port and socket,
        empty: nothing was persisted.
        """
        self.stop()
        self.start()

    def close(self) -> None:
        """
        Stop, and remove the folder.
        """
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Talking to it.

    def _connect(self, via: str, timeout: float) -> socket.socket:
        if via == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(str(self.socket_path))
            except BaseException:
                sock.close()
                raise
            return sock
        if via == "tls":
            assert self.ca_path is not None
            context = ssl.create_default_context(cafile=str(self.ca_path))
            raw = socket.create_connection((HOST, self.tls_port), timeout=timeout)
            try:
                return context.wrap_socket(raw, server_hostname="localhost")
            except BaseException:
                raw.close()
                raise
        return socket.create_connection((HOST, self.port), timeout=timeout)

    def command(
        self, *args: bytes | str | int, via: str = "unix", timeout: float = 5.0
    ) -> RespValue:
        """
        Send one command on a new connection ("unix", "tcp" or "tls") and
        return its reply: bytes, int, None or a list; an error reply raises
        L{RedisError}.
        """
        with self._connect(via, timeout) as sock:
            sock.sendall(_encode(args))
            return _reply(sock)

    def flushall(self) -> None:
        """
        Empty every database.
        """
        assert self.command("FLUSHALL") == b"OK"

    def log(self) -> str:
        try:
            return self.log_path.read_text("utf-8", "replace")
        except FileNotFoundError:
            return ""


# The fixtures (tests/conftest.py imports them).


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """
    One redis-server for the whole session; tests share it through
    C{redis_url}, which empties it first.
    """
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """
    The TCP store URL of the session's redis-server, emptied for this test.
    """
    if not redis_server.running or redis_server.paused:
        raise AssertionError("a test stopped the shared redis-server: use own_redis for that")
    redis_server.flushall()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """
    A redis-server of this test's own, which it may stop, kill, pause and
    restart; gone after the test.
    """
    with RedisServer() as server:
        yield server


class SilentLink:
    """
    A TCP relay to a L{RedisServer}, in a thread: what connects to C{port}
    is relayed to Redis' port.  L{go_silent} makes every connection relayed
    so far go quiet, both ways, without closing it (bytes are swallowed),
    as a network partition does, or a NAT that forgot an idle flow, or a
    failover that moved Redis' address; connections made afterwards are
    relayed as before.
    """

    def __init__(self, redis: RedisServer) -> None:
        self.redis = redis
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self._peers: dict[socket.socket, socket.socket] = {}
        self._silent: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._closing = False
        self._thread = threading.Thread(target=self._relay, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def go_silent(self) -> None:
        with self._lock:
            self._silent.update(self._peers)

    def _relay(self) -> None:
        for _ in itertools.count():
            for key, _events in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_reader:
                    return
                if sock is self.listener:
                    self._accept()
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                with self._lock:
                    silent, peer = sock in self._silent, self._peers.get(sock)
                if not data:
                    self._selector.unregister(sock)
                    if not silent and peer is not None:
                        self._selector.unregister(peer)
                        peer.close()
                    sock.close()
                elif not silent and peer is not None:
                    peer.sendall(data)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        try:
            upstream = socket.create_connection((HOST, self.redis.port), timeout=1)
        except OSError:
            client.close()
            return
        with self._lock:
            self._peers[client], self._peers[upstream] = upstream, client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def close(self) -> None:
        self._wake_writer.send(b"x")
        self._thread.join(timeout=10)
        for sock in [self.listener, self._wake_reader, self._wake_writer, *self._peers]:
            sock.close()
        self._selector.close()

    def __enter__(self) -> SilentLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
