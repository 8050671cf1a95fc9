"""
Tests for L{rendezvous_twisted.ops.systemd} and the unit files: sd_notify over a
real datagram socket, the watchdog, and a real twistd process started as
systemd starts it (an inherited listening socket as fd 3, C{LISTEN_*}
variables, C{$NOTIFY_SOCKET}).
"""

from __future__ import annotations

import configparser
import http.client
import os
import re
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock

from rendezvous_twisted import tap
from rendezvous_twisted.ops import systemd
from rendezvous_twisted.ops.service import Lifecycle, StoreService
from rendezvous_twisted.ops.systemd import Notifier, SystemdService, watchdog_interval_seconds

from .certificates import CA, cert_pem
from .test_end_to_end import CLEAN_EXIT, HOST, Conn, TwistdServer, create, secret
from .test_tap import descendants, parsed

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "contrib" / "systemd"


class NotifySocket:
    """
    A bound AF_UNIX datagram socket standing in for systemd's notify socket.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.messages: list[dict[str, str]] = []

    def close(self) -> None:
        self.sock.close()

    def pending(self) -> list[dict[str, str]]:
        """
        Every datagram already waiting, parsed into fields.
        """
        for _ in range(10_000):
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                break
            self._take()
        return self.messages

    def wait_for(
        self, field: str, timeout: float = 10.0, also: TwistdServer | None = None
    ) -> dict[str, str]:
        """
        The first message (already received or arriving within C{timeout})
        that has C{field}; reads C{also}'s output meanwhile.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            for message in self.messages:
                if field in message:
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([self.sock], [], [], min(remaining, 0.1))
            if readable:
                self._take()
            elif also is not None:
                also.pump(0)
        raise AssertionError(f"no {field} within {timeout}s; got {self.messages}")

    def _take(self) -> None:
        data = self.sock.recv(65536).decode("utf-8")
        self.messages.append(dict(line.split("=", 1) for line in data.split("\n") if line))


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifySocket]:
    address = (
        str(tmp_path / "notify") if request.param == "path" else f"@rendezvous-{uuid.uuid4().hex}"
    )
    listening = NotifySocket(address)
    yield listening
    listening.close()


def test_notifier_sends_datagrams(notify_socket: NotifySocket) -> None:
    """A Notifier sends NAME=value lines in one datagram, to a path or an abstract socket."""
    assert Notifier(notify_socket.address).send("READY=1", "STATUS=fine, thanks")
    assert notify_socket.wait_for("READY") == {"READY": "1", "STATUS": "fine, thanks"}


def test_notifier_without_systemd_does_nothing(tmp_path: Path) -> None:
    """Without NOTIFY_SOCKET, with an unusable one, or with nobody listening, sending is a no-op."""
    assert not Notifier.from_environment({}).send("READY=1")
    assert not Notifier("vsock:2:1234").send("READY=1")
    assert not Notifier(str(tmp_path / "nobody")).send("READY=1")


@pytest.mark.parametrize(
    ("environ", "seconds"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], seconds: float | None) -> None:
    """The watchdog runs at half WATCHDOG_USEC, only when WATCHDOG_PID is unset or ours."""
    assert watchdog_interval_seconds(environ, 4242) == seconds


def test_service_notifies_ready_status_watchdog_and_stopping(notify_socket: NotifySocket) -> None:
    """
    makeService tells systemd READY=1 with a STATUS once it listens, sends
    WATCHDOG=1 every half WATCHDOG_USEC, refreshes STATUS, and sends
    STOPPING=1 when stopped.
    """
    reactor = MemoryReactorClock()
    environ = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "4000000"}
    service = tap.makeService(parsed(["--listen=tcp:8081"]), reactor=reactor, environ=environ)
    service.startService()
    ready = notify_socket.wait_for("READY")
    assert ready["READY"] == "1"
    assert re.fullmatch(r"0 rendezvous, 0 parked readers, .*", ready["STATUS"]), ready
    [store] = [s for s in descendants(service) if isinstance(s, StoreService)]
    store.store.create(b"x", b"text/plain", "192.0.2.1")
    watchdogs = sum("WATCHDOG" in m for m in notify_socket.pending())
    assert watchdogs == 1, "the first watchdog ping goes out at start"
    reactor.advance(2.0)
    assert sum("WATCHDOG" in m for m in notify_socket.pending()) == watchdogs + 1
    reactor.advance(systemd.STATUS_INTERVAL_SECONDS)
    statuses = [m["STATUS"] for m in notify_socket.pending() if "STATUS" in m]
    assert statuses[-1].startswith("1 rendezvous, 0 parked readers"), statuses
    assert not any("STOPPING" in m for m in notify_socket.messages)
    d = service.stopService()
    assert notify_socket.wait_for("STOPPING")["STOPPING"] == "1"
    reactor.advance(0)
    assert d.called
    count = len(notify_socket.pending())
    reactor.advance(60)
    assert len(notify_socket.pending()) == count, "nothing is sent after the stop"


def test_no_ready_when_a_listener_fails(notify_socket: NotifySocket) -> None:
    """READY=1 is never sent while a listener could not listen."""
    reactor = MemoryReactorClock()
    lifecycle = Lifecycle()

    class Failing:
        def whenListening(self) -> Deferred[None]:
            return succeed(None)

    service = SystemdService(
        Notifier(notify_socket.address),
        [Failing()],
        lambda: "-",
        lifecycle,
        reactor,
    )
    service.startService()
    reactor.advance(systemd.STATUS_INTERVAL_SECONDS * 2)
    assert not any("READY" in m for m in notify_socket.pending())
    service.stopService()
    lifecycle.drained.callback(None)


# A real process, activated as systemd would.

#: Runs as the process systemd forks: puts the inherited socket on fd 3 and
#: sets LISTEN_PID to its own pid, which stays the same across exec.
EXEC_WRAPPER = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.set_inheritable(3, True)\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_socket_activation_and_notify(tmp_path: Path, tls: bool) -> None:
    """
    twistd rendezvous --listen systemd:domain=INET:name=web (or, as the unit
    does, tls:systemd:... with the certificate from a credentials directory)
    serves on the socket it inherits as fd 3, sends READY=1 once serving,
    and STOPPING=1 then exits cleanly on SIGTERM.
    """
    listen = "systemd:domain=INET:name=web"
    options: list[str] = []
    ca = CA.make("activation")
    if tls:
        credentials = tmp_path / "credentials"
        ca.write_leaf(credentials)
        listen = "tls:" + listen
        options = [
            f"--tls-cert={credentials / 'fullchain.pem'}",
            f"--tls-key={credentials / 'key.pem'}",
        ]
    notify = NotifySocket(str(tmp_path / "notify"))
    inherited = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    inherited.bind((HOST, 0))
    inherited.listen(16)
    port = inherited.getsockname()[1]
    process = TwistdServer(
        ["rendezvous", "--listen", listen, *options],
        tmp_path,
        {
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "web",
            "NOTIFY_SOCKET": notify.address,
        },
        prefix=[sys.executable, "-c", EXEC_WRAPPER, str(inherited.fileno())],
        pass_fds=[inherited.fileno()],
        port_line=re.compile(rb"RendezvousSite(?: \(TLS\))? starting on (\d+)"),
    )
    # The server holds its own copy now; ours must not keep the port open.
    inherited.close()
    try:
        assert process.port == port
        ready = notify.wait_for("READY", also=process)
        assert ready["READY"] == "1"
        assert "rendezvous" in ready["STATUS"]
        if tls:
            context = ssl.create_default_context(cadata=cert_pem(ca.root).decode("ascii"))
            client = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
            client.request("POST", "/", body=secret("activated"))
            created = client.getresponse()
            assert created.status == 200
            created.read()
            client.close()
        else:
            with Conn(port) as conn:
                rendezvous_id, _ = create(process, conn, secret("activated"))
                assert conn.exchange("GET", "/" + rendezvous_id).status == 200
        assert not any("STOPPING" in m for m in notify.pending())
        process.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING", also=process)["STOPPING"] == "1"
        code = process.stop()
    finally:
        process.stop()
        notify.close()
    assert code in CLEAN_EXIT, process.text()
    process.assert_no_trouble()


# The unit files.


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    # systemd continues lines with a trailing backslash; configparser with
    # indented continuation lines, which the unit also uses.
    parser.read_string((UNITS / name).read_text().replace("\\\n", "\n"))
    return parser


def test_units_hold_what_the_issue_asks(tmp_path: Path) -> None:
    """
    The socket passes a named descriptor; the service is Type=notify,
    socket-activated on that name with TLS from credentials, reloads with
    SIGHUP, and is hardened.
    """
    socket_unit = unit("rendezvous-twisted.socket")
    name = socket_unit["Socket"]["FileDescriptorName"]
    service = unit("rendezvous-twisted.service")["Service"]
    assert service["Type"] == "notify"
    exec_start = service["ExecStart"]
    assert f"--listen tls:systemd:domain=INET6:name={name}" in " ".join(exec_start.split())
    assert "--tls-key ${CREDENTIALS_DIRECTORY}/tls-key" in " ".join(exec_start.split())
    assert "--pidfile=" in exec_start
    # Every option the unit passes is valid: twistd would refuse to start.
    ca = CA.make("unit")
    ca.write_leaf(tmp_path)
    (tmp_path / "fullchain.pem").rename(tmp_path / "tls-cert")
    (tmp_path / "key.pem").rename(tmp_path / "tls-key")
    arguments = exec_start.replace("${CREDENTIALS_DIRECTORY}", str(tmp_path)).split()
    options = tap.Options()
    options.parseOptions(arguments[arguments.index("rendezvous") + 1 :])
    assert options["log-format"] == "json"
    assert options["metrics"] == "tcp:9090:interface=127.0.0.1"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    for key, value in {
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key
    assert int(service["LimitNOFILE"]) >= 65536
    assert "tls-key:" in service["LoadCredential"]


#: The template unit for several processes on one host (instance = port).
TEMPLATE = "rendezvous-twisted@.service"
#: Settings of the single service that are not about how it listens or
#: whom it serves: the template must keep every one of them.
NOT_HARDENING = {"LoadCredential", "ExecStart", "ExecReload", "EnvironmentFile"}


def test_template_unit_runs_one_process_per_port() -> None:
    """
    The template listens on the loopback port of its instance, takes --store
    from the environment, trusts the local balancer's X-Forwarded-For, and
    keeps every hardening and lifecycle setting of the single service.
    """
    service = unit(TEMPLATE)["Service"]
    single = unit("rendezvous-twisted.service")["Service"]
    for key, value in single.items():
        if key not in NOT_HARDENING:
            assert service.get(key) == value, key
    assert service["EnvironmentFile"] == "-/etc/rendezvous-twisted/store.env"
    exec_start = service["ExecStart"]
    arguments = (
        exec_start.replace("%i", "8081")
        .replace("${RENDEZVOUS_STORE}", "redis://127.0.0.1:6379/0")
        .replace("$RENDEZVOUS_OPTIONS", "--store-timeout-seconds 0.5")
        .split()
    )
    options = tap.Options()
    options.parseOptions(arguments[arguments.index("rendezvous") + 1 :])
    assert options["listen"] == ["tcp:8081:interface=127.0.0.1"]
    assert options["metrics"] == "tcp:18081:interface=127.0.0.1"
    assert options["store"] == "redis://127.0.0.1:6379/0"
    assert options["proxy-header"] == "x-forwarded-for"
    assert [str(n) for n in options["config"].trusted_proxies] == ["127.0.0.1/32", "::1/128"]


def test_units_verify(tmp_path: Path) -> None:
    """
    systemd-analyze verify accepts the socket, the service and the template,
    ExecStart pointing at this checkout's twistd.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; .ci/run installs it")
    names = ("rendezvous-twisted.socket", "rendezvous-twisted.service", TEMPLATE)
    for name in names:
        text = (UNITS / name).read_text()
        twistd = Path(sys.executable).parent / "twistd"
        (tmp_path / name).write_text(
            text.replace("/opt/rendezvous-twisted/bin/twistd", str(twistd))
        )
    result = subprocess.run(
        [
            analyze,
            "verify",
            *(str(tmp_path / n) for n in names),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rendezvous-twisted" not in result.stderr, result.stderr
