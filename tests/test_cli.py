"""
C{rendezvous-cli}: the installed console script, run as a person runs it from
two terminals, against a real C{twistd rendezvous} subprocess; and its
output rules in process, on a Clock.
"""

from __future__ import annotations

import http.client
import io
import os
import re
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from twisted.internet.defer import Deferred

from rendezvous_twisted.client.cli import (
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    _Streams,
    qr_code,
    run,
)
from rendezvous_twisted.client.rendezvous import RendezvousClient

from .conftest import BASE, Harness, fired
from .test_end_to_end import TwistdServer, running, secret, start_plugin_server

CLI = Path(sys.executable).parent / "rendezvous-cli"
#: Bound on every CLI process: far above what an exchange takes.
DEADLINE_SECONDS = 20.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    One C{twistd rendezvous} for the module.
    """
    yield from running(start_plugin_server(tmp_path_factory.mktemp("twistd"), "--poll-timeout=10"))


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """
    Run the console script to completion (bounded) and return what it did.
    """
    return subprocess.run(
        [str(CLI), *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )


def wait_for_stderr(proc: subprocess.Popen[bytes], text: bytes) -> bytes:
    """
    Read C{proc}'s standard error until C{text} appears, within the deadline.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    seen = bytearray()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while text not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {text!r} on stderr within {DEADLINE_SECONDS}s: {seen!r}"
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            assert chunk, f"stderr closed before {text!r} (exit {proc.poll()}): {seen!r}"
            seen += chunk
    return bytes(seen)


def test_two_terminals_complete_an_exchange(server: TwistdServer) -> None:
    """create, a waiting receive in a second process, send, then cancel: a whole exchange."""
    base = f"http://127.0.0.1:{server.port}/"
    offer, answer = secret("offer"), secret("answer")
    server.secrets += [offer, answer]
    created = cli("create", "--server", base, "--content-type", "text/plain", stdin=offer)
    assert created.returncode == 0, created.stderr
    url = created.stdout.decode("ascii").strip()
    assert url.startswith(base) and "\n" not in url
    server.secrets.append(url.rsplit("/", 1)[1].encode("ascii"))
    assert b"expires in" in created.stderr

    # Terminal A waits for B's answer, and B sends it.
    receiver = subprocess.Popen(
        [str(CLI), "receive", url, "--timeout", str(DEADLINE_SECONDS)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_stderr(receiver, b"waiting for a new payload")
        assert receiver.poll() is None
        sent = cli("send", url, "--data", answer.decode())
        assert (sent.returncode, sent.stdout) == (0, b""), sent.stderr
        # What was sent, briefly, on standard error (standard output is for payloads).
        assert re.fullmatch(
            rb'rendezvous-cli: sent %d bytes \(application/octet-stream\); ETag "[^"]+"\n'
            % len(answer),
            sent.stderr,
        ), sent.stderr
        out, err = receiver.communicate(timeout=DEADLINE_SECONDS)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.communicate(timeout=5)
    assert receiver.returncode == 0, err
    assert out == answer

    cancelled = cli("cancel", url)
    assert (cancelled.returncode, cancelled.stderr) == (0, b"rendezvous-cli: cancelled\n")
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", urlsplit(url).path)
        assert connection.getresponse().status == 404
    finally:
        connection.close()


def test_an_unreachable_server_exits_4() -> None:
    """The console script exits 4 with a message when no server answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    # The port was free a moment ago: nobody listens there now.
    nobody = cli("create", "--server", f"http://127.0.0.1:{free}/")
    assert nobody.returncode == EXIT_UNREACHABLE
    assert f"no answer from the server at http://127.0.0.1:{free}/".encode() in nobody.stderr
    assert b"is it running?" in nobody.stderr
    assert nobody.stdout == b""


#: Usage mistakes of the console script: (arguments, what the error names).
USAGE_MISTAKES: list[tuple[list[str], list[str]]] = [
    (["receive", "127.0.0.1:8080/abc"], ["argument url: '127.0.0.1:8080/abc'", "http://"]),
    (["send", "--data", "x", "not-a-url"], ["argument url: 'not-a-url'", "URL create printed"]),
    (["cancel", "ftp://127.0.0.1/abc"], ["argument url: 'ftp://127.0.0.1/abc'"]),
    (["create", "--server", "127.0.0.1:8080"], ["argument --server: '127.0.0.1:8080'"]),
    (["create", "--server", "http://127.0.0.1:port/"], ["argument --server"]),
    (["receive", "--timeout", "-5", "http://127.0.0.1:1/x"], ["argument --timeout: '-5'"]),
    (["receive", "--timeout", "nan", "http://127.0.0.1:1/x"], ["argument --timeout: 'nan'"]),
    (["receive", "--timeout", "soon", "http://127.0.0.1:1/x"], ["argument --timeout: 'soon'"]),
]


@pytest.mark.parametrize(
    ("arguments", "expected"), USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES]
)
def test_a_bad_url_or_timeout_is_a_usage_error(arguments: list[str], expected: list[str]) -> None:
    """A URL that is not http(s) or a timeout that is not a positive number exits 2, named."""
    result = cli(*arguments)
    error = result.stderr.decode()
    assert result.returncode == EXIT_USAGE, error
    assert "Traceback" not in error and result.stdout == b""
    assert len(error.splitlines()) <= 5, error
    for text in expected:
        assert text in error, error


# In process, on a Clock.


class TTY(io.StringIO):
    """A standard error that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_in_harness(harness: Harness, argv: list[str], stderr: io.StringIO) -> tuple[int, bytes]:
    stdout = io.BytesIO()
    client = RendezvousClient(harness.clock, harness.client)
    streams = _Streams(io.BytesIO(b"from stdin"), stdout, stderr)
    d: Deferred[int] = Deferred.fromCoroutine(run(harness.clock, argv, streams, client))
    harness.flush()
    code: int = fired(d)
    return code, stdout.getvalue()


class TerminalInput(io.BytesIO):
    """A standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_send_from_a_terminal_without_data_is_a_usage_error(capsys: Any) -> None:
    """send with no --data and a terminal for standard input exits 2 and writes nothing."""
    harness = Harness()
    rendezvous_id, _ = harness.create()
    streams = _Streams(TerminalInput(), io.BytesIO(), io.StringIO())
    client = RendezvousClient(harness.clock, harness.client)
    failures: list[Any] = []
    Deferred.fromCoroutine(
        run(harness.clock, ["send", f"{BASE}/{rendezvous_id}"], streams, client)
    ).addErrback(failures.append)
    [failure] = failures
    assert failure.check(SystemExit) and failure.value.code == EXIT_USAGE
    assert "send needs a payload: --data TEXT" in capsys.readouterr().err
    assert harness.call("GET", f"/{rendezvous_id}").body != b""


def test_create_draws_a_qr_code_on_a_terminal_only() -> None:
    """create prints the URL alone on stdout, and the QR code only to a terminal's stderr."""
    harness = Harness()
    on_terminal = TTY()
    code, out = run_in_harness(harness, ["create", "--server", f"{BASE}/"], on_terminal)
    assert code == 0
    url = out.decode().strip()
    assert url.startswith(f"{BASE}/")
    drawing = qr_code(url)
    assert drawing is not None and drawing.count("\n") > 10
    assert drawing in on_terminal.getvalue()
    # The payload came from standard input.
    rendezvous_id = url.rsplit("/", 1)[1]
    assert harness.call("GET", f"/{rendezvous_id}").body == b"from stdin"

    piped = io.StringIO()
    code, out = run_in_harness(harness, ["create", "--server", f"{BASE}/"], piped)
    assert code == 0
    assert "\u2588" not in piped.getvalue() and len(piped.getvalue().splitlines()) == 1
    no_qr = TTY()
    run_in_harness(harness, ["create", "--server", f"{BASE}/", "--no-qr"], no_qr)
    assert len(no_qr.getvalue().splitlines()) == 1


def test_send_is_conditional_on_what_it_read(monkeypatch: Any) -> None:
    """send reads the current ETag and writes with If-Match on it (or --force without)."""
    harness = Harness()
    rendezvous_id, _ = harness.create(b"first")
    url = f"{BASE}/{rendezvous_id}"
    seen: list[dict[str, Any]] = []
    original = harness.client.request

    def recording(method: str, target: str, **kwargs: Any) -> Any:
        seen.append({"method": method, **kwargs["headers"]})
        return original(method, target, **kwargs)

    monkeypatch.setattr(harness.client, "request", recording)
    code, _ = run_in_harness(harness, ["send", url, "--data", "second"], io.StringIO())
    assert code == 0
    assert [s["method"] for s in seen] == ["GET", "PUT"]
    assert "If-Match" in seen[1]
    seen.clear()
    code, _ = run_in_harness(harness, ["send", url, "--force", "--data", "third"], io.StringIO())
    assert code == 0
    assert [s["method"] for s in seen] == ["PUT"] and "If-Match" not in seen[0]
    assert harness.call("GET", f"/{rendezvous_id}").body == b"third"


def test_refusals_timeouts_and_usage_errors_have_their_exit_codes() -> None:
    """A stale If-Match or a 404 exits 1, a receive that sees nothing in time 3, bad usage 2."""
    harness = Harness(poll_timeout_seconds=20)
    rendezvous_id, _ = harness.create(b"x")
    url = f"{BASE}/{rendezvous_id}"
    stderr = io.StringIO()
    code, out = run_in_harness(harness, ["send", url, "--if-match", '"stale"'], stderr)
    assert (code, out) == (EXIT_REFUSED, b"")
    assert "M_CONCURRENT_WRITE" in stderr.getvalue()

    stderr = io.StringIO()
    client = RendezvousClient(harness.clock, harness.client)
    streams = _Streams(None, io.BytesIO(), stderr)
    argv = ["receive", url, "--timeout", "5"]
    d: Deferred[int] = Deferred.fromCoroutine(run(harness.clock, argv, streams, client))
    harness.flush()
    harness.advance(5)
    assert fired(d) == EXIT_TIMEOUT
    assert "nothing new" in stderr.getvalue()

    harness.call("DELETE", f"/{rendezvous_id}")
    stderr = io.StringIO()
    code, out = run_in_harness(harness, ["cancel", url], stderr)
    assert (code, out) == (EXIT_REFUSED, b"")
    assert "404 M_NOT_FOUND" in stderr.getvalue()

    with pytest.raises(SystemExit) as usage:
        run_in_harness(harness, ["send"], io.StringIO())
    assert usage.value.code == EXIT_USAGE


def test_version_names_this_package() -> None:
    """rendezvous-cli --version names rendezvous-twisted and its version, then Twisted's."""
    from rendezvous_twisted import __version__

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith(f"rendezvous-twisted {__version__} (Twisted ")
