"""
Graceful shutdown of a real C{twistd rendezvous} process: on SIGTERM it stops
accepting, answers parked readers 304, lets requests in flight finish, closes
every connection, and exits within C{--shutdown-timeout-seconds}.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import time
from pathlib import Path

from .test_end_to_end import (
    CLEAN_EXIT,
    HOST,
    PARKED_PROOF_SECONDS,
    Conn,
    TwistdServer,
    create,
    etag_of,
    secret,
    start_plugin_server,
)

#: A loose bound for how long twistd takes to exit once it has nothing left
#: to wait for (2 cores shared with other test runs).
EXIT_SLACK_SECONDS = 3.0


def refuses_connections(port: int, timeout: float = 5.0) -> bool:
    """
    Whether the port refuses new connections within C{timeout}: a connection
    the kernel still accepted while the server closes its socket must be
    closed or reset without an answer.
    """
    deadline = time.monotonic() + timeout
    for _ in range(100):
        try:
            probe = socket.create_connection((HOST, port), timeout=1)
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            # The listening socket closed during the handshake: no answer
            # either; the next try is refused.
            continue
        with probe:
            if probe.getsockname() == probe.getpeername():
                continue  # the kernel connected the probe to itself: nobody listens
            readable, _, _ = select.select([probe], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                return False
            try:
                if probe.recv(1) != b"":
                    return False
            except ConnectionResetError:
                pass
        if time.monotonic() > deadline:
            break
    return False


def exit_code_within(process: TwistdServer, seconds: float) -> int | None:
    """
    The process' exit code if it exits within C{seconds}, reading its output
    meanwhile; None if it is still running.
    """
    deadline = time.monotonic() + seconds
    for _ in range(100_000):
        code = process.proc.poll()
        if code is not None:
            return code
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        process.pump(min(remaining, 0.05))
    return None


def test_sigterm_drains_parked_readers_and_in_flight_requests(tmp_path: Path) -> None:
    """
    On SIGTERM every parked reader gets 304, an upload in progress completes
    with 202, idle keep-alive connections are closed, new connections are
    refused, and twistd exits cleanly well before the poll timeout.
    """
    process = start_plugin_server(tmp_path, "--poll-timeout=30", "--shutdown-timeout-seconds=10")
    readers: list[Conn] = []
    try:
        with Conn(process.port) as writer, Conn(process.port) as uploader:
            rendezvous_id, created = create(process, writer, secret("drain"))
            path = "/" + rendezvous_id
            etag = etag_of(created)
            for _ in range(3):
                reader = Conn(process.port)
                readers.append(reader)
                reader.request("GET", path, [("If-None-Match", etag)])
            for reader in readers:
                assert reader.quiet_for(PARKED_PROOF_SECONDS)
            update = secret("late-write")
            process.secrets.append(update)
            uploader.send(
                uploader.head("PUT", path, [("Content-Length", str(len(update)))]) + update[:5]
            )
            assert uploader.quiet_for(PARKED_PROOF_SECONDS)

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            for reader in readers:
                answer = reader.read_response(timeout=5.0)
                assert answer.status == 304, (answer.head, answer.body)
                assert answer.header("ETag") == etag
            # The idle keep-alive connection is closed, not left hanging.
            assert writer.read_until_closed(timeout=5.0) == b""
            assert writer.closed_by_peer
            assert refuses_connections(process.port)
            # The upload begun before SIGTERM is still served to the end.
            uploader.send(update[5:])
            written = uploader.read_response(timeout=5.0)
            assert written.status == 202, (written.head, written.body)
            assert uploader.read_until_closed(timeout=5.0) == b""
            for reader in readers:
                assert reader.read_until_closed(timeout=5.0) == b""
            code = exit_code_within(process, EXIT_SLACK_SECONDS)
            elapsed = time.monotonic() - signalled
    finally:
        for reader in readers:
            reader.close()
        final = process.stop()
    assert code in CLEAN_EXIT, process.text()
    assert final == code
    assert elapsed < EXIT_SLACK_SECONDS + 1, f"exit took {elapsed:.2f}s"
    assert re.search(rb"draining: \d+ requests? in flight", process.output), process.text()
    assert b"stopped gracefully" in process.output
    process.assert_no_trouble()


def test_shutdown_timeout_bounds_a_stalled_upload(tmp_path: Path) -> None:
    """
    An upload that stalls past --shutdown-timeout-seconds is aborted, and the
    process exits soon after the timeout rather than waiting for it.
    """
    timeout = 1.0
    process = start_plugin_server(tmp_path, f"--shutdown-timeout-seconds={timeout}")
    try:
        with Conn(process.port) as stalled:
            stalled.send(stalled.head("POST", "/", [("Content-Length", "100")]) + b"only some")
            assert stalled.quiet_for(PARKED_PROOF_SECONDS)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = exit_code_within(process, timeout + EXIT_SLACK_SECONDS)
            elapsed = time.monotonic() - signalled
            # Aborted: closed with a reset, or a close with nothing sent.
            try:
                rest = stalled.read_until_closed(timeout=1.0)
            except ConnectionResetError:
                rest = b""
            assert rest == b""
    finally:
        final = process.stop()
    assert code in CLEAN_EXIT, process.text()
    assert final == code
    assert timeout <= elapsed < timeout + EXIT_SLACK_SECONDS, f"exit took {elapsed:.2f}s"
    assert b"shutdown timeout: aborting 1 request on 1 connection" in process.output
