"""
The redis-server harness itself (tests/redis_server.py): it starts a real
Redis that keeps nothing on disk, and stops, kills, pauses and restarts it
on the same addresses.
"""

from __future__ import annotations

import socket

import pytest

from .redis_server import RedisError, RedisServer

#: Long enough for a live Redis on loopback to answer; short, since a paused
#: one never does.
SILENCE_SECONDS = 0.2


def test_answers_on_tcp_and_unix_socket(own_redis: RedisServer) -> None:
    """
    A started server answers on its TCP port and its unix socket, and both
    are the same database.
    """
    assert own_redis.command("SET", "k", b"\x00\xffv", via="tcp") == b"OK"
    assert own_redis.command("GET", "k", via="unix") == b"\x00\xffv"
    assert own_redis.url == f"redis://127.0.0.1:{own_redis.port}/0"
    assert own_redis.unix_url == f"unix://{own_redis.socket_path}?db=0"
    assert own_redis.port != 6379
    with pytest.raises(RedisError, match="unknown command"):
        own_redis.command("NO-SUCH-COMMAND")


def test_keeps_nothing_on_disk(own_redis: RedisServer) -> None:
    """
    The server has no snapshot and no append-only file configured, and
    writes neither, even when stopped with data in memory.
    """
    assert own_redis.command("CONFIG", "GET", "save") == [b"save", b""]
    assert own_redis.command("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
    own_redis.command("SET", "secret", "payload")
    own_redis.stop()
    on_disk = {p.name for p in own_redis.directory.iterdir()}
    assert on_disk == {"redis.log"}, on_disk


def test_restart_keeps_the_addresses_and_loses_the_data(own_redis: RedisServer) -> None:
    """
    restart() comes back on the same port and socket, empty.
    """
    port, url = own_redis.port, own_redis.url
    own_redis.command("SET", "k", "v")
    own_redis.restart()
    assert (own_redis.port, own_redis.url) == (port, url)
    assert own_redis.answers()
    assert own_redis.command("GET", "k", via="tcp") is None


def test_stopped_and_killed_servers_refuse_connections(own_redis: RedisServer) -> None:
    """
    After stop() or kill() nothing listens: connecting is refused at once.
    """
    own_redis.stop()
    assert not own_redis.running
    with pytest.raises(ConnectionRefusedError):
        own_redis.command("PING", via="tcp")
    own_redis.start()
    own_redis.kill()
    assert not own_redis.running
    with pytest.raises(ConnectionRefusedError):
        own_redis.command("PING", via="tcp")
    own_redis.start()
    assert own_redis.answers()


def test_paused_server_accepts_but_never_answers(own_redis: RedisServer) -> None:
    """
    A paused server still accepts connections but answers nothing until it
    is resumed; then it answers what was asked meanwhile.
    """
    with socket.create_connection(("127.0.0.1", own_redis.port), timeout=5) as sock:
        own_redis.pause()
        assert own_redis.paused and own_redis.running
        with pytest.raises(TimeoutError):
            own_redis.command("PING", via="tcp", timeout=SILENCE_SECONDS)
        sock.sendall(b"PING\r\n")
        own_redis.resume()
        assert not own_redis.paused
        assert sock.recv(100) == b"+PONG\r\n"
    assert own_redis.answers()


def test_stop_while_paused(own_redis: RedisServer) -> None:
    """
    stop() ends a paused server too, promptly and gracefully.
    """
    own_redis.pause()
    assert own_redis.stop() == 0
    assert not own_redis.running


def test_tls() -> None:
    """
    A TLS server answers on its TLS port to a client that trusts only the
    private CA named in its rediss:// URL.
    """
    with RedisServer(tls=True) as server:
        assert server.command("PING", via="tls") == b"PONG"
        assert server.ca_path is not None
        assert server.tls_url == (f"rediss://localhost:{server.tls_port}/0?ca={server.ca_path}")
        assert server.tls_port not in (0, server.port)


def test_redis_url_is_emptied(redis_server: RedisServer, redis_url: str) -> None:
    """
    The redis_url fixture hands out the shared server's TCP URL, emptied.
    """
    assert redis_url == redis_server.url
    assert redis_server.command("DBSIZE") == 0
    redis_server.command("SET", "left-behind", "x")
