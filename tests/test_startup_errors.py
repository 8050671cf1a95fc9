"""
Start-up mistakes, made as a newcomer makes them, with the real C{twistd}:
each ends the program with a short message naming the option (or the
environment variable) as it was written, and a correct example or what to
do; never a traceback, and never twistd's whole help.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from .certificates import CA
from .test_end_to_end import HOST, REPO, TWISTD, twistd_environment

#: At most this many lines for a usage error: the message and a pointer to the help.
USAGE_LINES = 3


def run_twistd(
    args: Sequence[str],
    cwd: Path,
    env: Mapping[str, str] | None = None,
    prefix: Sequence[str] = (),
) -> tuple[int, str]:
    """
    Run C{twistd ARGS} from the working tree (after the command C{prefix},
    if any) until it exits; its exit code and everything it printed
    (standard output and error together).
    """
    result = subprocess.run(
        [*prefix, str(TWISTD), *args],
        cwd=cwd,
        env=twistd_environment(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout


def assert_short_error(code: int, output: str, *expected: str) -> None:
    """
    The run failed with a short message that holds every C{expected} text
    and no traceback.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    assert code != 0, output
    assert "Traceback" not in output, output
    assert "Usage: twistd" not in output, output
    assert 0 < len(lines) <= USAGE_LINES, output
    for text in expected:
        assert text in output, output


# Command-line mistakes: (arguments after "rendezvous", texts the error holds).
MISTAKES: list[tuple[list[str], list[str]]] = [
    (["--listen", "8080x"], ["--listen 8080x", "--listen 9000"]),
    (["--listen", "tcp:notaport"], ["--listen tcp:notaport", "not 'notaport'", "--listen 9000"]),
    (["--listen", "foo:1"], ["--listen foo:1", "unknown endpoint type 'foo'"]),
    (["--listen", "tcp:65536"], ["--listen tcp:65536", "not in 0-65535"]),
    (["--listen", "tcp6:99999:interface=\\:\\:1"], ["not in 0-65535"]),
    (["--listen", "tcp:8080:colour=blue"], ["--listen tcp:8080:colour=blue", "colour="]),
    (["--listen", "ssl:8443"], ["--listen ssl:8443", "--tls-cert and --tls-key"]),
    (["--listen", "tls:tcp:8443"], ["--listen tls:tcp:8443", "--tls-cert and --tls-key"]),
    (["--listen", "ssl:8443:sslmethod=TLSv1_METHOD"], ["--listen ssl:8443", "sslmethod"]),
    (["--listen", "unix:/nonexistent/dir/rz.sock"], ["--listen unix:", "no such directory"]),
    (["--listen", "systemd:domain=CARRIER_PIGEON:index=0"], ["--listen systemd:", "domain="]),
    (["--listen", ""], ["--listen ''", "--listen 9000"]),
    (["--metrics", "9090x"], ["--metrics 9090x", "--metrics 9090"]),
    (
        ["--listen", "127.0.0.1:9000"],
        ["--listen 127.0.0.1:9000", "--listen tcp:9000:interface=127.0.0.1"],
    ),
    (["--listen", "tls:8443"], ["--listen tls:8443", "--listen ssl:8443"]),
    (["--listen", "9000", "--listen", "9000"], ["--listen 9000 is given twice"]),
    (["--metrics", "8080"], ["--metrics 8080 and --listen (default", "its own port"]),
    (["--port", "9000"], ["--port", "--listen 9000"]),
    (["-p", "9000"], ["-p", "--listen 9000"]),
    (["9000"], ["'9000'", "--listen 9000"]),
    (["-n"], ["-n", "before 'rendezvous'", "twistd -n rendezvous"]),
    (["--pidfile=x.pid"], ["--pidfile", "before 'rendezvous'"]),
    (["--ttl", "abc"], ["--ttl abc: not a number", "--ttl 60"]),
    (["--ttl", "0"], ["--ttl 0", "--ttl 60"]),
    (["--ttl"], ["--ttl needs a value", "--ttl 60"]),
    (["--ttll", "5"], ["--ttll", "did you mean --ttl?"]),
    (["--max-bytes", "1.5"], ["--max-bytes 1.5", "whole number", "--max-bytes 10240"]),
    (["--max", "5"], ["--max could be any of", "--max-bytes"]),
    (["--no-access-log=yes"], ["--no-access-log takes no value"]),
    (
        ["--max-rendezvous", "31"],
        ["--max-rendezvous-per-address (default 32) must not exceed --max-rendezvous 31"],
    ),
    (
        ["--max-connections", "50"],
        ["--max-connections-per-address (default 100) must not exceed --max-connections 50"],
    ),
    (["--ipv6-prefix-length", "129"], ["--ipv6-prefix-length 129 must be at most 128"]),
    (["--proxy-header", "via"], ["--proxy-header via must be x-forwarded-for or forwarded"]),
    (["--public-url", "example.org"], ["--public-url example.org", "https://"]),
    (["--msc4108-session-prefix", "/"], ["--msc4108-session-prefix /"]),
    (["--trusted-proxy", "10.0.0.1/8"], ["--trusted-proxy 10.0.0.1/8", "10.0.0.0/8"]),
    (["--deny", "everyone"], ["--deny everyone", "CIDR"]),
    (["--store", "mysql://h/0"], ["--store", "redis://"]),
    (["--store", "redis://h:notaport/0"], ["--store"]),
    (["--store-password-file", "/nonexistent/pw"], ["--store-password-file", "Redis store"]),
    (
        ["--store", "redis://h/0", "--store-password-file", "/nonexistent/pw"],
        ["--store-password-file /nonexistent/pw", "No such file"],
    ),
    (["--tls-cert", "/nonexistent/cert.pem"], ["--tls-cert and --tls-key go together"]),
    (
        ["--listen", "ssl:8443", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k"],
        ["--tls-cert", "cannot read /nonexistent/c.pem"],
    ),
    (["--log-format", "xml"], ["--log-format xml", "text, json"]),
]


@pytest.mark.parametrize(
    ("arguments", "expected"), MISTAKES, ids=[" ".join(a) or "empty" for a, _ in MISTAKES]
)
def test_command_line_mistake_is_a_short_error(
    tmp_path: Path, arguments: list[str], expected: list[str]
) -> None:
    """A command-line mistake ends twistd with a short message naming the option as written."""
    code, output = run_twistd(["-n", "--pidfile=", "rendezvous", *arguments], tmp_path)
    assert_short_error(
        code, output, "twistd rendezvous: ", "see: twistd rendezvous --help", *expected
    )


def test_a_cluster_of_mistakes_names_the_first(tmp_path: Path) -> None:
    """With several mistakes, the first one is named, still in a short message."""
    code, output = run_twistd(
        ["-n", "--pidfile=", "rendezvous", "--listen", "8080", "--ttl", "soon", "--port", "1"],
        tmp_path,
    )
    assert_short_error(code, output, "--port")


@pytest.mark.parametrize(
    ("where", "problem"),
    [("/nonexistent/dir/twistd.log", "no such directory"), (".", "is a directory")],
)
def test_a_logfile_twistd_cannot_write_is_a_short_error(
    tmp_path: Path, where: str, problem: str
) -> None:
    """twistd's --logfile that cannot be written is named before twistd fails on it."""
    code, output = run_twistd(["-n", "--pidfile=", f"--logfile={where}", "rendezvous"], tmp_path)
    assert_short_error(code, output, f"twistd's --logfile {where}", problem)


def test_a_pidfile_twistd_cannot_write_is_a_short_error(tmp_path: Path) -> None:
    """twistd's --pidfile in a missing directory is named before twistd fails on it."""
    code, output = run_twistd(
        ["-n", "--pidfile=/nonexistent/dir/twistd.pid", "rendezvous"], tmp_path
    )
    assert_short_error(code, output, "twistd's --pidfile /nonexistent/dir/twistd.pid")


@pytest.mark.parametrize(
    ("twistd_options", "expected"),
    [
        (["--pidfile="], "which twistd closes when it daemonizes: add -n before 'rendezvous'"),
        (["-n", "--pidfile=", "--logfile=x.log"], "not to twistd's --logfile x.log: drop one"),
        (["-n", "--pidfile=", "--syslog"], "not to twistd's --syslog: drop one"),
    ],
)
def test_json_logs_that_would_reach_nobody_are_a_short_error(
    tmp_path: Path, twistd_options: list[str], expected: str
) -> None:
    """--log-format json daemonized, or beside --logfile or --syslog, is refused before starting."""
    code, output = run_twistd(
        [*twistd_options, "rendezvous", "--listen", "0", "--log-format", "json"], tmp_path
    )
    assert_short_error(code, output, "twistd rendezvous: --log-format json writes to standard")
    assert expected in output
    # Nothing was daemonized, nor written where nobody looks.
    assert not (tmp_path / "x.log").exists()


def test_help_is_still_whole(tmp_path: Path) -> None:
    """`twistd rendezvous --help` prints the whole help, and succeeds."""
    code, output = run_twistd(["rendezvous", "--help"], tmp_path)
    assert code == 0, output
    assert "--listen=" in output and "--ttl=" in output
    assert "9000 (on 127.0.0.1 only)" in " ".join(output.split())
    assert len(output.splitlines()) > 50


# The .tac, configured by the environment.

ENVIRONMENT_MISTAKES: list[tuple[dict[str, str], list[str]]] = [
    ({"RENDEZVOUS_TTL": "abc"}, ["RENDEZVOUS_TTL=abc: not a number", "RENDEZVOUS_TTL=60"]),
    ({"RENDEZVOUS_TTLL": "5"}, ["RENDEZVOUS_TTLL=5", "did you mean RENDEZVOUS_TTL?"]),
    (
        {"RENDEZVOUS_PORT": "9000"},
        ["RENDEZVOUS_PORT=9000: no such setting", "RENDEZVOUS_LISTEN=9000"],
    ),
    (
        {"RENDEZVOUS_METRICS": "8080"},
        ["RENDEZVOUS_METRICS=8080 and RENDEZVOUS_LISTEN (default", "its own port"],
    ),
    ({"RENDEZVOUS_LISTEN": "8080x"}, ["RENDEZVOUS_LISTEN=8080x", "RENDEZVOUS_LISTEN=9000"]),
    (
        {"RENDEZVOUS_MAX_RENDEZVOUS": "31"},
        [
            "RENDEZVOUS_MAX_RENDEZVOUS_PER_ADDRESS (default 32) must not exceed "
            "RENDEZVOUS_MAX_RENDEZVOUS=31"
        ],
    ),
    ({"RENDEZVOUS_PROXY_HEADER": "via"}, ["RENDEZVOUS_PROXY_HEADER=via must be"]),
    ({"RENDEZVOUS_NO_ACCESS_LOG": "maybe"}, ["RENDEZVOUS_NO_ACCESS_LOG=maybe: must be 1 or 0"]),
    ({"RENDEZVOUS_STORE": "mysql://h"}, ["RENDEZVOUS_STORE: must be memory:"]),
    ({"RENDEZVOUS_TLS_KEY": "/k.pem"}, ["RENDEZVOUS_TLS_CERT and RENDEZVOUS_TLS_KEY go together"]),
]


@pytest.mark.parametrize(
    ("environ", "expected"),
    ENVIRONMENT_MISTAKES,
    ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in ENVIRONMENT_MISTAKES],
)
def test_environment_mistake_is_a_short_error(
    tmp_path: Path, environ: dict[str, str], expected: list[str]
) -> None:
    """A bad or unknown RENDEZVOUS_* variable ends `twistd -ny rendezvous.tac`, naming it."""
    code, output = run_twistd(
        ["-n", "--pidfile=", "-y", str(REPO / "rendezvous.tac")], tmp_path, environ
    )
    assert_short_error(code, output, "rendezvous.tac: ", *expected)


# Mistakes only the start can tell: the message is the last line, after
# twistd's own first lines.


def assert_failed_start(code: int, output: str, *expected: str) -> None:
    """
    The start failed, with a last line holding every C{expected} text, no
    traceback, and no more than a few of twistd's start-up lines before it.
    """
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1, output
    assert "Traceback" not in output, output
    assert lines, output
    for text in expected:
        assert text in lines[-1], output
    assert len(lines) <= 8, output


def _taken_port() -> socket.socket:
    """
    A socket listening on a loopback port, so that the server cannot.
    """
    taken = socket.socket()
    taken.bind((HOST, 0))
    taken.listen(1)
    return taken


def test_a_port_in_use_is_a_short_error(tmp_path: Path) -> None:
    """Listening on a port another process holds fails with one line naming --listen."""
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        code, output = run_twistd(
            ["-n", "--pidfile=twistd.pid", "rendezvous", f"--listen=tcp:{port}:interface={HOST}"],
            tmp_path,
        )
    assert_failed_start(
        code, output, f"cannot listen on --listen tcp:{port}:interface={HOST}", "already in use"
    )
    # twistd would have removed its PID file after an exception of its own.
    assert not (tmp_path / "twistd.pid").exists()


def test_a_metrics_port_in_use_is_a_short_error(tmp_path: Path) -> None:
    """A --metrics port another process holds fails with one line naming --metrics."""
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        code, output = run_twistd(
            ["-n", "--pidfile=", "rendezvous", "--listen", "0", "--metrics", str(port)],
            tmp_path,
        )
    # Named as written: --metrics PORT, not the endpoint it stands for.
    assert_failed_start(code, output, f"cannot listen on --metrics {port}:", "already in use")


def test_metrics_on_the_port_of_listen_is_a_short_error(tmp_path: Path) -> None:
    """--metrics on --listen's port is a usage error naming both, not 'another process'."""
    code, output = run_twistd(
        ["-n", "--pidfile=", "rendezvous", "--listen", "9000", "--metrics", "9000"], tmp_path
    )
    assert_short_error(
        code, output, "--metrics 9000 and --listen 9000 both listen on port 9000 of 127.0.0.1"
    )
    assert "another process" not in output


def test_json_logs_say_a_failed_start_in_json(tmp_path: Path) -> None:
    """With --log-format json, the failed start is a JSON line at level critical."""
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        code, output = run_twistd(
            ["-n", "--pidfile=", "rendezvous", "--listen", str(port), "--log-format=json"],
            tmp_path,
        )
    assert_failed_start(code, output, '"level": "critical"', "already in use")


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


@pytest.mark.skipif(
    _unprivileged_port_start() <= 80, reason="this kernel lets anyone listen on port 80"
)
def test_a_privileged_port_without_privilege_is_a_short_error(tmp_path: Path) -> None:
    """Port 80 without the right to listen there fails with one line saying what to do."""
    prefix: list[str] = []
    if os.geteuid() == 0:
        # Root without the capability that lets it listen below 1024.
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop a capability"
        prefix = [setpriv, "--bounding-set=-net_bind_service"]
    code, output = run_twistd(
        ["-n", "--pidfile=", "rendezvous", "--listen", "80"], tmp_path, prefix=prefix
    )
    assert_failed_start(code, output, "cannot listen on --listen 80:", "CAP_NET_BIND_SERVICE")


def test_a_systemd_socket_not_passed_is_a_short_error(tmp_path: Path) -> None:
    """A systemd: listener run outside systemd ends with a line naming --listen, not IndexError."""
    code, output = run_twistd(
        ["-n", "--pidfile=", "rendezvous", "--listen", "systemd:domain=INET:name=https"], tmp_path
    )
    assert_short_error(code, output, "--listen systemd:domain=INET:name=https", "systemd passed")


def test_a_tls_listener_with_good_files_starts(tmp_path: Path) -> None:
    """The checks refuse nothing sound: a TLS listener with good files gets past them."""
    CA.make("sound").write_leaf(tmp_path)
    code, output = run_twistd(
        [
            "-n",
            "--pidfile=",
            "rendezvous",
            "--listen",
            "ssl:0:interface=127.0.0.1",
            f"--tls-cert={tmp_path / 'fullchain.pem'}",
            f"--tls-key={tmp_path / 'key.pem'}",
            # Stops it once it has read the files: no such address.
            "--metrics",
            "tcp:0:interface=256.0.0.1",
        ],
        tmp_path,
    )
    assert "TLS certificate loaded" in output, output
    assert_failed_start(code, output, "cannot listen on --metrics")


# The same, in this process.


def test_a_listen_failure_is_a_startup_error_naming_the_listener() -> None:
    """A listener that cannot listen raises StartupError naming it as the user wrote it."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory

    from rendezvous_twisted.ops.service import ListenerService, StartupError

    with _taken_port() as taken:
        port = taken.getsockname()[1]
        listener = ListenerService(TCP4ServerEndpoint(reactor, port, interface=HOST), Factory())
        listener.label = f"--listen {port}"
        with pytest.raises(StartupError) as caught:
            listener.privilegedStartService()
    assert str(caught.value) == (
        f"cannot listen on --listen {port}: the address is already in use: another process "
        "listens there (ss -ltnp shows which)"
    )


def test_a_program_logs_the_failed_start_and_exits() -> None:
    """
    Run as a program, the root logs a failed start as one critical line
    and ends with StartFailed, which twistd handles as an exception (its
    clean-up) and Python as an exit with status 1; run as a library, it
    raises the StartupError.
    """
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.protocol import Factory
    from twisted.logger import capturedLogs, formatEvent

    from rendezvous_twisted.ops.logs import RendezvousRoot
    from rendezvous_twisted.ops.service import ListenerService, StartFailed, StartupError

    with _taken_port() as taken:
        port = taken.getsockname()[1]
        for program in (None, "twistd rendezvous"):
            root = RendezvousRoot(program=program)
            endpoint = TCP4ServerEndpoint(reactor, port, interface=HOST)
            ListenerService(endpoint, Factory()).setServiceParent(root)  # type: ignore[no-untyped-call]
            with capturedLogs() as events:
                if program is None:
                    with pytest.raises(StartupError):
                        root.privilegedStartService()
                else:
                    with pytest.raises(StartFailed) as caught:
                        root.privilegedStartService()
    assert isinstance(caught.value, Exception) and isinstance(caught.value, SystemExit)
    assert caught.value.code == 1
    assert str(caught.value).startswith("twistd rendezvous: cannot listen on a listener: ")
    [failed] = [e for e in events if e["log_level"].name == "critical"]
    assert formatEvent(failed) == str(caught.value)


def test_a_daemon_that_cannot_listen_says_so_and_exits(tmp_path: Path) -> None:
    """
    Daemonized (no -n), a start that cannot listen ends twistd at once with
    its "An error has occurred" line naming --listen (twistd's parent waits
    for the start: it must be told), the reason in the log, and no traceback.
    """
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        code, output = run_twistd(
            [
                f"--pidfile={tmp_path / 'twistd.pid'}",
                f"--logfile={tmp_path / 'twistd.log'}",
                "rendezvous",
                "--listen",
                str(port),
            ],
            tmp_path,
        )
    assert code == 1, output
    assert "An error has occurred" in output and "cannot listen on --listen" in output, output
    log = (tmp_path / "twistd.log").read_text()
    assert "Traceback" not in log, log
    # Named as written: --listen PORT, not the endpoint it stands for.
    assert f"cannot listen on --listen {port}: the address is" in log
    assert not (tmp_path / "twistd.pid").exists()
