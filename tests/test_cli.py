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
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from rendezvous_twisted.client.cli import (
    ACCESS_TOKEN_VARIABLE,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    run,
)
from rendezvous_twisted.client.commands import Streams, qr_code
from rendezvous_twisted.client.rendezvous import RendezvousClient

from .conftest import BASE, Harness, fired
from .homeserver import USER_TOKEN, homeserver
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


@contextmanager
def background(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """
    The console script running on (a terminal that waits), its output on
    pipes; killed if it still runs when the block ends.
    """
    proc = subprocess.Popen(
        [str(CLI), *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)


def wait_for_stderr(proc: subprocess.Popen[bytes], text: bytes) -> bytes:
    """
    Read C{proc}'s standard error until C{text} appears, within the deadline.
    """
    assert proc.stderr is not None
    return wait_for_output(proc, proc.stderr, text)


def wait_for_output(proc: subprocess.Popen[bytes], pipe: Any, text: bytes) -> bytes:
    """
    Read one of C{proc}'s output C{pipe}s until C{text} appears, within the
    deadline; return all that was read.
    """
    fd = pipe.fileno()
    seen = bytearray()
    deadline = time.monotonic() + DEADLINE_SECONDS
    while text not in seen:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {text!r} within {DEADLINE_SECONDS}s: {seen!r}"
        readable, _, _ = select.select([fd], [], [], remaining)
        if readable:
            chunk = os.read(fd, 4096)
            assert chunk, f"output closed before {text!r} (exit {proc.poll()}): {seen!r}"
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
    with background("receive", url, "--timeout", str(DEADLINE_SECONDS)) as receiver:
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


# MSC4388, with --protocol msc4388.


def msc4388_cli(
    base: str, *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """
    Run an MSC4388 command (C{args}[0]) against the server at C{base}.
    """
    command, *rest = args
    # Only the token the test gives, never one of the environment it runs in.
    inherited = {k: v for k, v in os.environ.items() if k != ACCESS_TOKEN_VARIABLE}
    return subprocess.run(
        [str(CLI), command, "--protocol", "msc4388", "--server", base, *rest],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=DEADLINE_SECONDS,
        check=False,
        env={**inherited, **(env or {})},
    )


def test_msc4388_two_terminals_complete_an_exchange(server: TwistdServer) -> None:
    """
    A creates a session and waits; B runs the command A printed to read the
    offer, and answers; A prints the answer; B deletes the session.
    """
    base = f"http://127.0.0.1:{server.port}"
    offer, answer = secret("offer"), secret("answer")
    server.secrets += [offer, answer]
    create = ["create", "--protocol", "msc4388", "--server", base, "--wait"]
    with background(*create, f"--timeout={DEADLINE_SECONDS}", f"--data={offer.decode()}") as a:
        session_id = wait_for_output(a, a.stdout, b"\n").decode("ascii")
        session_id = session_id.removesuffix("\n")
        assert re.fullmatch(r"[0-9A-Za-z._~-]{16,255}", session_id), session_id
        server.secrets.append(session_id.encode("ascii"))
        said = wait_for_stderr(a, b"waiting for the other side's answer").decode()
        assert f"rendezvous-cli: session {session_id} on {base} (unstable prefix)\n" in said
        assert re.search(r"sequence token \S+; expires in 30\d s\n", said), said
        # B runs what A printed for the other device.
        [printed] = re.findall(r"the other device: (.*)\n", said)
        words = shlex.split(printed)
        other = ["receive", "--protocol", "msc4388", "--server", base, "--no-wait", session_id]
        assert words == ["rendezvous-cli", *other]
        read = subprocess.run(
            [str(CLI), *words[1:]], capture_output=True, timeout=DEADLINE_SECONDS, check=False
        )
        assert (read.returncode, read.stdout, read.stderr) == (0, offer, b"")
        assert a.poll() is None

        sent = msc4388_cli(base, "send", session_id, stdin=answer)
        assert (sent.returncode, sent.stdout) == (0, b""), sent.stderr
        assert re.fullmatch(
            rb"rendezvous-cli: sent %d bytes; sequence token \S+\n" % len(answer), sent.stderr
        ), sent.stderr
        out, err = a.communicate(timeout=DEADLINE_SECONDS)
    assert a.returncode == 0, err
    assert out == answer

    cancelled = msc4388_cli(base, "cancel", session_id)
    assert (cancelled.returncode, cancelled.stderr) == (0, b"rendezvous-cli: cancelled\n")
    gone = msc4388_cli(base, "receive", "--no-wait", session_id)
    assert (gone.returncode, gone.stdout) == (EXIT_REFUSED, b"")
    assert b"the server refused: 404 M_NOT_FOUND" in gone.stderr


def test_msc4388_send_names_its_token_and_transaction(server: TwistdServer) -> None:
    """
    send --txn-id repeated gets the first answer and writes once; a stale
    --sequence-token is refused with the conflict, exit 1.
    """
    base = f"http://127.0.0.1:{server.port}"
    created = msc4388_cli(base, "create", "--data", "offer")
    assert created.returncode == 0, created.stderr
    session_id = created.stdout.decode("ascii").strip()
    [token] = re.findall(rb"sequence token (\S+);", created.stderr)
    send = ["send", session_id, f"--sequence-token={token.decode()}"]
    first = msc4388_cli(base, *send, "--txn-id=t1", "--data=answer")
    assert first.returncode == 0, first.stderr
    again = msc4388_cli(base, *send, "--txn-id=t1", "--data=answer")
    assert (again.returncode, again.stderr) == (0, first.stderr)
    assert msc4388_cli(base, "receive", "--no-wait", session_id).stdout == b"answer"

    stale = msc4388_cli(base, *send, "--data=late")
    assert stale.returncode == EXIT_REFUSED
    assert stale.stderr.startswith(
        b"rendezvous-cli: someone else wrote first (409 IO_ELEMENT_MSC4388_CONCURRENT_WRITE: "
    ), stale.stderr
    assert msc4388_cli(base, "receive", "--no-wait", session_id).stdout == b"answer"


def test_msc4388_discover_prints_create_available(server: TwistdServer) -> None:
    """discover prints create_available as the server says it, on standard output."""
    result = cli("discover", "--server", f"http://127.0.0.1:{server.port}/")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        b"create_available: true\n",
        b"",
    )


@pytest.fixture
def authenticated(tmp_path: Path) -> Iterator[TwistdServer]:
    """
    A C{twistd rendezvous --msc4388 authenticated} whose homeserver is the
    stand-in of L{tests.homeserver}, in this process.
    """
    with homeserver() as stand_in:
        process = start_plugin_server(
            tmp_path, "--msc4388=authenticated", f"--homeserver={stand_in.url}"
        )
        process.secrets.append(USER_TOKEN.encode())
        yield from running(process)


def test_msc4388_access_token(authenticated: TwistdServer) -> None:
    """
    Where only a homeserver's users may create, discover and create use the
    token of RENDEZVOUS_ACCESS_TOKEN or --access-token; without one, create
    is refused (403, exit 1) with a hint naming the variable, and an unknown
    one is a 401.
    """
    base = f"http://127.0.0.1:{authenticated.port}/"
    good = {ACCESS_TOKEN_VARIABLE: USER_TOKEN}
    bad = {ACCESS_TOKEN_VARIABLE: "syt_not_a_token"}
    assert msc4388_cli(base, "discover").stdout == b"create_available: false\n"
    assert msc4388_cli(base, "discover", env=good).stdout == b"create_available: true\n"

    refused = msc4388_cli(base, "create", "--data", "x")
    assert (refused.returncode, refused.stdout) == (EXIT_REFUSED, b"")
    assert b"the server refused: 403 M_FORBIDDEN" in refused.stderr
    assert ACCESS_TOKEN_VARIABLE.encode() in refused.stderr
    assert len(refused.stderr.splitlines()) == 1

    for env, argv in ((good, []), ({}, [f"--access-token={USER_TOKEN}"])):
        created = msc4388_cli(base, "create", "--data", "x", *argv, env=env)
        assert created.returncode == 0, created.stderr
    # Sessions themselves are anonymous.
    session_id = created.stdout.decode("ascii").strip()
    assert msc4388_cli(base, "receive", "--no-wait", session_id).stdout == b"x"

    wrong = msc4388_cli(base, "create", "--data", "x", env=bad)
    assert (wrong.returncode, wrong.stdout) == (EXIT_REFUSED, b"")
    assert b"the server refused: 401 M_UNKNOWN_TOKEN" in wrong.stderr
    assert b"the access token is not valid" in wrong.stderr


def test_the_console_script_says_a_mistake_in_one_line() -> None:
    """
    The installed script exits 2 on a mistake found after parsing (here a
    payload that is not UTF-8 with msc4388), with one line and no traceback,
    before any request (no server listens there).
    """
    result = cli(
        "create", "--protocol", "msc4388", "--server", "http://127.0.0.1:1/", stdin=b"\xff"
    )
    assert (result.returncode, result.stdout) == (EXIT_USAGE, b"")
    assert result.stderr == (
        b"rendezvous-cli create: error: --protocol msc4388 sends text: the payload on "
        b"standard input is not UTF-8\n"
    )


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
    # A protocol's options with the other, and MSC4388's ids and choices.
    (
        ["receive", "--protocol", "msc4388", "http://127.0.0.1:1/abc"],
        ["argument ID: 'http://127.0.0.1:1/abc' is not an MSC4388 session id", "--server"],
    ),
    (
        ["send", "--protocol", "msc4388", "--if-match", '"e"', "--data", "x", "abc"],
        ["--if-match does not go with --protocol msc4388", "--sequence-token"],
    ),
    (
        ["create", "--protocol", "msc4388", "--content-type", "text/plain"],
        ["--content-type does not go with --protocol msc4388"],
    ),
    (["create", "--access-token", "t"], ["--access-token does not go with --protocol native"]),
    (
        ["send", "--txn-id", "t", "--data", "x", "http://127.0.0.1:1/x"],
        ["--txn-id does not go with --protocol native"],
    ),
    (
        ["receive", "--server", "http://127.0.0.1:1/", "http://127.0.0.1:1/x"],
        ["--server goes with create or --protocol msc4388"],
    ),
    (["create", "--protocol", "msc5000"], ["argument --protocol: invalid choice: 'msc5000'"]),
    (["discover", "--prefix", "beta"], ["argument --prefix: invalid choice: 'beta'"]),
    (["discover", "--protocol", "native"], ["argument --protocol: invalid choice: 'native'"]),
    (["discover", "--server", "example.org"], ["argument --server: 'example.org'"]),
    ([], ["the following arguments are required: COMMAND"]),
]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    USAGE_MISTAKES,
    ids=[" ".join(a) or "nothing" for a, _ in USAGE_MISTAKES],
)
def test_a_start_up_mistake_is_one_line(
    arguments: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """
    A bad URL, id, timeout or choice, or an option of the other protocol,
    exits 2 with one line naming it, before any request.
    """
    stdout = io.BytesIO()
    failures: list[Any] = []
    streams = Streams(io.BytesIO(b""), stdout, io.StringIO())
    Deferred.fromCoroutine(run(Clock(), arguments, streams, http=NoRequests())).addErrback(
        failures.append
    )
    [failure] = failures
    assert failure.check(SystemExit) and failure.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    error = captured.err
    assert (captured.out, stdout.getvalue()) == ("", b"")
    assert len(error.splitlines()) == 1, error
    for text in expected:
        assert text in error, error


class NoRequests:
    """A requester for commands that must not make any request."""

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        raise AssertionError(f"{method} {url} was requested")


# In process, on a Clock.


class TTY(io.StringIO):
    """A standard error that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def run_in_harness(harness: Harness, argv: list[str], stderr: io.StringIO) -> tuple[int, bytes]:
    stdout = io.BytesIO()
    client = RendezvousClient(harness.clock, harness.client)
    streams = Streams(io.BytesIO(b"from stdin"), stdout, stderr)
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
    streams = Streams(TerminalInput(), io.BytesIO(), io.StringIO())
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
    streams = Streams(None, io.BytesIO(), stderr)
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
