"""
The documentation's commands, run as a reader would run them.

Every fenced C{sh} or C{python} block of README.md and docs/*.md carries a
marker, an HTML comment on the line just above its opening fence, that says
who runs it:

    <!-- tested by tests/test_docs.py::test_runs_against_a_server -->
    <!-- tested by tests/test_tls.py::test_some_test -->
    <!-- needs: systemd as PID 1 -->
    <!-- run by CI: .ci/run -->

C{tested by} names a test function that must exist; in this module it must be
one of L{RUNNERS}, the tests that run every block naming them (the three
generic ones, L{test_runs_against_a_server}, L{test_starts_and_serves} and
L{test_runs_alone}, and a few for blocks that need more wiring: the README's
start command, rendezvous-cli's two terminals, a homeserver's nginx, the
Redis settings).
A marker may also name a test elsewhere that runs the same command.
C{needs:} names what a test machine lacks, from L{NEEDS}. C{run by CI} is
for the README's test command alone, which must be a line of C{.ci/run}. A
command block without a marker, or with any other, fails
L{test_every_command_block_is_run_or_marked}. Other fenced blocks (text,
yaml, nginx) may carry a C{tested by} marker too, and it is checked alike.

How the runners run a block:
  - In a fresh temporary directory that holds what a clone's top folder
    holds for the reader: C{.venv} (a link to the virtualenv running these
    tests), C{rendezvous.tac} and C{contrib/}.
  - Port numbers the docs use (8080, 8081, ... see L{DOC_PORTS}) become free
    loopback ports, and Redis' 6379 the port of a private redis-server
    (tests/redis_server.py); nothing else of a command is changed.
  - A block that talks to a server first gets the server its page starts:
    the commands of the nearest block above it marked for
    L{test_starts_and_serves} (README's start command when there is none),
    each C{twistd -n} line left running in the background until the block
    is done, every other line run before it.  A server's command names the
    ports it listens on (C{--listen 8080}, C{--metrics 9090}, or an endpoint
    C{tcp:8080:...}, C{ssl:8443:...}).  A block that needs no server (a
    version, a mistake and what it is told) is run alone.
  - Lines of the form C{#   text} (a hash and three spaces) are output the
    reader should see: each must match some line of the block's output,
    where C{...} stands for anything.
  - A block must exit 0 within L{BLOCK_DEADLINE_SECONDS}, and every server
    must stop cleanly on SIGTERM without logging a traceback.
"""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .homeserver import USER_TOKEN, homeserver
from .msc4388_client import STABLE_PREFIX, UNSTABLE_PREFIX, ProposalClient
from .redis_server import RedisServer, free_port
from .test_end_to_end import read_available
from .test_msc4388_end_to_end import whole_exchange
from .test_multinode import nginx_conf

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
VENV = Path(sys.prefix)

#: Fenced blocks a reader runs: each needs a marker.
COMMAND_LANGUAGES = frozenset({"sh", "python"})
#: Fences that would hide commands from this check: write them as sh or python.
DISGUISED_LANGUAGES = frozenset({"bash", "shell", "console", "zsh", "py", "python3", "pycon"})
#: What a block may need that a test machine lacks (a marker may name several,
#: separated by "; ").
NEEDS = frozenset(
    {
        "systemd as PID 1",
        "a public DNS name and certificate",
        "a Matrix homeserver",
    }
)
#: The tests of this module that run the blocks naming them.
RUNNERS = (
    "test_runs_against_a_server",
    "test_starts_and_serves",
    "test_runs_alone",
    "test_the_start_command_serves",
    "test_two_terminals_with_rendezvous_cli",
    "test_two_terminals_with_rendezvous_cli_msc4388",
    "test_a_homeserver_proxy_carries_msc4108",
    "test_a_homeserver_proxy_carries_msc4388_to_two_processes",
    "test_the_redis_settings_serve_an_exchange",
)
#: Ports the docs use; each becomes a free loopback port while a block runs.
DOC_PORTS = ("8080", "8081", "8082", "8083", "8084", "8443", "9090")
#: Redis' port in the docs; it becomes the private redis-server's.
DOC_REDIS_PORT = "6379"

BLOCK_DEADLINE_SECONDS = 30.0
START_DEADLINE_SECONDS = 15.0
STOP_DEADLINE_SECONDS = 10.0
#: How long a wait on a server's log file sleeps in proc.wait() between two looks.
POLL_SECONDS = 0.02
#: How twistd ends after a graceful SIGTERM: it re-raises the signal on exit.
CLEAN_EXIT = (0, -signal.SIGTERM)
#: What a failure inside a server would print.
TROUBLE = ("Traceback", "Unhandled error", "#critical]")

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<language>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>tested by|needs:|run by CI:)\s*(?P<value>.*?)\s*-->\s*$")
_EXPECTED = re.compile(r"^#   (?P<text>\S.*)$")


@dataclass(frozen=True)
class Block:
    """
    One fenced block of a page: its language, its text (the fence's
    indentation removed) and the marker above it.
    """

    page: Path
    line: int
    language: str
    text: str
    marker_kind: str | None
    marker_value: str | None

    @property
    def where(self) -> str:
        page = self.page.relative_to(REPO) if self.page.is_relative_to(REPO) else self.page
        return f"{page}:{self.line}"

    def tested_by(self, test: str) -> bool:
        """
        Whether the marker names C{test} of this module.
        """
        return (
            self.marker_kind == "tested by" and self.marker_value == f"tests/test_docs.py::{test}"
        )


def blocks_of(page: Path) -> list[Block]:
    """
    Every fenced block of a Markdown page, in order.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = opening["indent"]
        start = index
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index].removeprefix(indent))
            index += 1
        index += 1
        above = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = _MARKER.match(above)
        found.append(
            Block(
                page=page,
                line=start + 1,
                language=opening["language"],
                text="\n".join(body) + "\n",
                marker_kind=marker["kind"].rstrip(":") if marker else None,
                marker_value=marker["value"] if marker else None,
            )
        )
    return found


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def claimed_by(test: str) -> list[Block]:
    return [block for block in ALL_BLOCKS if block.tested_by(test)]


def _test_exists(reference: str) -> bool:
    """
    Whether C{tests/test_x.py::test_name} names a test function of that file.
    """
    path, _, name = reference.partition("::")
    source = REPO / path
    if not name or not path.startswith("tests/") or not source.is_file():
        return False
    tree = ast.parse(source.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


def _ci_runs(command: str) -> bool:
    ci = REPO / ".ci" / "run"
    return ci.is_file() and command in (line.strip() for line in ci.read_text().splitlines())


def faults_of(blocks: list[Block]) -> list[str]:
    """
    What is wrong with the markers of these blocks, one line per fault.
    """
    faults = []
    for block in blocks:
        if block.language in DISGUISED_LANGUAGES:
            faults.append(f"{block.where}: fenced as {block.language!r}; write sh or python")
        if block.marker_kind == "tested by":
            reference = block.marker_value or ""
            if not _test_exists(reference):
                faults.append(f"{block.where}: no test {reference}")
            elif reference.startswith("tests/test_docs.py::") and not any(
                block.tested_by(runner) for runner in RUNNERS
            ):
                faults.append(f"{block.where}: {reference} runs no block; name one of {RUNNERS}")
        if block.language not in COMMAND_LANGUAGES:
            continue
        if block.marker_kind is None:
            faults.append(f"{block.where}: no marker says which test runs it, or what it needs")
        elif block.marker_kind == "needs":
            unknown = set((block.marker_value or "").split("; ")) - NEEDS
            if unknown:
                faults.append(f"{block.where}: needs {sorted(unknown)}, not in NEEDS")
        elif block.marker_kind == "run by CI":
            command = block.text.strip()
            if block.page.name != "README.md" or block.marker_value != ".ci/run":
                faults.append(f"{block.where}: only README's test command is run by .ci/run")
            elif not _ci_runs(command):
                faults.append(f"{block.where}: .ci/run does not run {command!r}")
    return faults


def test_every_command_block_is_run_or_marked() -> None:
    """
    Every sh and python block of the docs names the test that runs it, or what it needs that a
    test machine lacks, and no command block hides behind another fence.
    """
    faults = faults_of(ALL_BLOCKS)
    assert not faults, "\n".join(faults)


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """
    A page's unmarked, disguised or wrongly marked command blocks (an indented one included)
    are each a fault, and every runner of this module has a block of the docs to run.
    """
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n```sh\necho unmarked\n```\n\n"
        "```bash\necho disguised\n```\n\n"
        "- an item:\n\n  ```python\n  print('indented, unmarked')\n  ```\n\n"
        "<!-- needs: a quantum computer -->\n```sh\necho needs\n```\n\n"
        "<!-- tested by tests/test_docs.py::test_no_such_test -->\n```sh\necho a\n```\n\n"
        "<!-- tested by tests/test_docs.py::test_every_command_block_is_run_or_marked -->\n"
        "```sh\necho b\n```\n\n"
        "<!-- run by CI: .ci/run -->\n```sh\necho c\n```\n\n"
        "<!-- needs: systemd as PID 1 -->\n```sh\necho fine\n```\n\n"
        "```text\nnot a command\n```\n"
    )
    blocks = blocks_of(page)
    assert [b.language for b in blocks] == ["sh", "bash", "python", *["sh"] * 5, "text"]
    assert blocks[2].text == "print('indented, unmarked')\n"
    faults = faults_of(blocks)
    expected = [
        "no marker", "fenced as 'bash'", "no marker", "needs ['a quantum computer']",
        "no test", "tests/test_docs.py::test_every_command_block_is_run_or_marked runs no block",
        "only README's",
    ]  # fmt: skip
    assert len(faults) == len(expected), faults
    for fault, start in zip(faults, expected, strict=True):
        assert fault.partition(": ")[2].startswith(start), (fault, start)
    for test in RUNNERS:
        assert claimed_by(test), f"no block names {test}"


# Running blocks.


@dataclass
class Process:
    """
    A shell command in a session of its own (so that everything it starts
    can be signalled together), its output (stdout and stderr together)
    read through select() with a deadline; or, for a long-running server
    given a C{log} file, written there, so that a server nobody reads from
    never blocks on a full pipe.
    """

    command: str
    cwd: Path
    env: Mapping[str, str]
    log: Path | None = None
    output: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self._sink = self.log.open("wb") if self.log is not None else None
        self.proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", self.command],
            cwd=self.cwd,
            env=dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=self._sink or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.eof = False

    def pump(self, timeout: float) -> None:
        """
        Wait up to C{timeout} seconds for more output (or, with a log file,
        for the process to end), then take what is there.
        """
        if self.log is not None:
            try:
                self.proc.wait(timeout=min(max(0.0, timeout), POLL_SECONDS))
                self.eof = True
            except subprocess.TimeoutExpired:
                pass
            self.output[:] = self.log.read_bytes()
            return
        if self.eof:
            return
        assert self.proc.stdout is not None
        self.eof = read_available(self.proc.stdout.fileno(), self.output, timeout)

    def text(self) -> str:
        if self.log is not None:
            self.output[:] = self.log.read_bytes()
        return self.output.decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """
        The first match of C{pattern} in the output, waiting up to
        C{timeout} seconds for it to be printed.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            match = re.search(pattern, self.text())
            if match is not None:
                return match
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                break
            self.pump(remaining)
        raise AssertionError(f"{self.command!r} never printed {pattern!r}:\n{self.text()}")

    def finish(self, timeout: float) -> int:
        """
        Wait for the command to end (all its output read); kill its session
        past C{timeout}.
        """
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if self.eof or remaining <= 0:
                break
            self.pump(remaining)
        try:
            code = self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.command!r} did not finish within {timeout} s:\n{self.text()}"
            ) from None
        self.close()
        return code

    def stop(self) -> int:
        """
        SIGTERM to the whole session (SIGKILL if it outlives the deadline);
        the command's exit code.
        """
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.finish(STOP_DEADLINE_SECONDS)
        finally:
            self.kill()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.close()

    def close(self) -> None:
        if self.log is not None:
            self.text()
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()
        if self._sink is not None and not self._sink.closed:
            self._sink.close()
        self.eof = True


def logical_lines(text: str) -> list[str]:
    """
    The commands of a shell block: comments and blank lines dropped,
    backslash continuations joined.
    """
    commands: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"a continuation runs off the block's end: {pending!r}"
    return commands


#: A port a server's command names: an endpoint's (tcp:8080:..., ssl:8443:...)
#: or a bare one (--listen 8080, --metrics 9090).
_NAMED_PORT = re.compile(r"(?:tcp6?|ssl):(\d+)|--(?:listen|metrics)[= ](\d+)(?!\S)")


def ports_named(command: str) -> list[int]:
    """
    The ports a server's command listens on, in the order it names them.
    """
    found = (endpoint or bare for endpoint, bare in _NAMED_PORT.findall(command))
    return [int(port) for port in found if port != "0"]


def _is_server(command: str) -> bool:
    return re.search(r"\btwistd\s+(-n|-ny|--nodaemon)\b", command) is not None


def _served_once(port: int) -> None:
    """
    Ask the server on C{port} one HTTP/1.0 question and read its answer to
    the end: the server has then accepted, served and let go of that
    connection.  A bare connect would not do: the kernel accepts it before
    the server runs, which may count it against a connection cap that the
    block then tests.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
        probe.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
        probe.settimeout(START_DEADLINE_SECONDS)
        for _ in range(100_000):
            if not probe.recv(65536):
                return


@dataclass
class Workspace:
    """
    A temporary stand-in for a clone's top folder, and the substitutions
    that put the docs' ports on free ones.
    """

    directory: Path
    redis: RedisServer | None
    ports: dict[str, int] = field(default_factory=dict)
    servers: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.directory / ".venv").symlink_to(VENV)
        (self.directory / "rendezvous.tac").symlink_to(REPO / "rendezvous.tac")
        (self.directory / "contrib").symlink_to(REPO / "contrib")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    def substitute(self, text: str) -> str:
        for port in DOC_PORTS:
            if re.search(rf"(?<![\d.]){port}(?!\d)", text):
                if port not in self.ports:
                    self.ports[port] = free_port()
                text = re.sub(rf"(?<![\d.]){port}(?!\d)", str(self.ports[port]), text)
        if re.search(rf"(?<![\d.]){DOC_REDIS_PORT}(?!\d)", text):
            assert self.redis is not None, "this block needs Redis: give the runner redis_server"
            text = re.sub(rf"(?<![\d.]){DOC_REDIS_PORT}(?!\d)", str(self.redis.port), text)
        return text

    def run(self, command: str, timeout: float = BLOCK_DEADLINE_SECONDS) -> Process:
        process = Process(self.substitute(command), self.directory, self.env)
        code = process.finish(timeout)
        assert code == 0, f"exit code {code} from\n{process.command}\n{process.text()}"
        return process

    def start_servers(self, block: Block) -> list[int]:
        """
        Run the block's commands: set-up lines to their end, C{twistd -n}
        lines in the background until each listens on every port it names.
        The ports, in the order the commands name them.
        """
        ports: list[int] = []
        for command in logical_lines(block.text):
            if not _is_server(command):
                self.run(command)
                continue
            concrete = self.substitute(command)
            log = self.directory / f"server-{len(self.servers)}.log"
            server = Process(concrete, self.directory, self.env, log)
            self.servers.append(server)
            own = ports_named(concrete)
            assert own, f"{block.where}: name the port in {command!r} (--listen 8080)"
            for port in own:
                self._wait_listening(server, port)
            if re.search(r"--store[= ](redis|rediss|unix)://", concrete):
                # It serves once both its connections to Redis are up.
                server.wait_for(
                    r"(?s)connected to Redis.*connected to Redis", START_DEADLINE_SECONDS
                )
            ports += own
        return ports

    def start_twistd(self, block: Block, options: str) -> int:
        """
        C{.venv/bin/twistd -n rendezvous} with these options (which name a
        docs port: it is substituted), for the test of C{block}; its port.
        """
        command = f".venv/bin/twistd -n rendezvous {options}\n"
        (port,) = self.start_servers(Block(block.page, block.line, "sh", command, None, None))
        return port

    def _wait_listening(self, server: Process, port: int) -> None:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        for _ in range(100_000):
            try:
                _served_once(port)
                return
            except ConnectionRefusedError:
                pass
            if server.proc.poll() is not None or time.monotonic() > deadline:
                server.finish(1)
                raise AssertionError(
                    f"{server.command!r} never listened on {port}:\n{server.text()}"
                )
            server.pump(POLL_SECONDS)

    def stop_servers(self) -> None:
        """
        Stop every server started here; each must stop cleanly and must
        have logged no trouble.
        """
        faults = []
        for server in self.servers:
            code = server.stop()
            if code not in CLEAN_EXIT:
                faults.append(f"{server.command!r} exited {code}:\n{server.text()}")
            for word in TROUBLE:
                if word in server.text():
                    faults.append(f"{word!r} in the log of {server.command!r}:\n{server.text()}")
        self.servers.clear()
        assert not faults, "\n".join(faults)


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    space = Workspace(tmp_path, None)
    try:
        yield space
    finally:
        for server in space.servers:
            server.kill()


def _expected_lines(block: Block) -> list[str]:
    return [m["text"] for line in block.text.splitlines() if (m := _EXPECTED.match(line))]


def assert_printed(expected: list[str], output: str, block: Block) -> None:
    """
    Each expected line (C{...} standing for anything) matches some line of
    the output.
    """
    lines = [line.rstrip("\r") for line in output.splitlines()]
    missing = []
    for text in expected:
        pattern = re.compile(".*".join(re.escape(part) for part in text.split("...")))
        if not any(pattern.search(line) for line in lines):
            missing.append(text)
    assert not missing, f"{block.where}: never printed {missing}; the output:\n{output}"


README_START = next(
    block for block in ALL_BLOCKS if block.tested_by("test_the_start_command_serves")
)


def server_block_for(block: Block) -> Block:
    """
    The block that starts the server C{block} talks to: the nearest one
    above it on its page that L{test_starts_and_serves} runs, else the
    README's start command.
    """
    above = [
        b
        for b in ALL_BLOCKS
        if b.page == block.page and b.line < block.line and b.tested_by("test_starts_and_serves")
    ]
    return above[-1] if above else README_START


def _start_as_readme_says(space: Workspace) -> None:
    """
    The README's start command, from its twistd on: C{.venv} exists already
    (CI's ./check made it, and pip installed the working tree into it).
    """
    command = README_START.text.strip().rpartition("&& ")[2]
    assert command == ".venv/bin/twistd -n rendezvous", README_START.text
    # The default listener is 8080; the docs' port substitution moves it.
    space.start_twistd(README_START, "--listen tcp:8080:interface=127.0.0.1")


def _serve_for(block: Block, space: Workspace) -> None:
    source = server_block_for(block)
    if source is README_START:
        _start_as_readme_says(space)
    else:
        space.start_servers(source)


def _needs_redis(*blocks: Block) -> bool:
    return any(re.search(rf"(?<![\d.]){DOC_REDIS_PORT}(?!\d)", b.text) for b in blocks)


def _block_id(block: Block) -> str:
    return block.where


@pytest.mark.parametrize("block", claimed_by("test_runs_against_a_server"), ids=_block_id)
def test_runs_against_a_server(
    block: Block, workspace: Workspace, request: pytest.FixtureRequest
) -> None:
    """
    A block that talks to a server runs to its end, exit code 0, against the server its page
    starts, and prints what its comments say it prints.
    """
    if _needs_redis(block, server_block_for(block)):
        workspace.redis = request.getfixturevalue("redis_server")
    _serve_for(block, workspace)
    if block.language == "python":
        script = workspace.directory / "example.py"
        script.write_text(workspace.substitute(block.text))
        process = workspace.run(f"{VENV / 'bin' / 'python'} example.py")
    else:
        process = workspace.run(block.text)
    expected = [workspace.substitute(line) for line in _expected_lines(block)]
    assert_printed(expected, process.text(), block)
    workspace.stop_servers()


@pytest.mark.parametrize("block", claimed_by("test_runs_alone"), ids=_block_id)
def test_runs_alone(block: Block, workspace: Workspace) -> None:
    """
    A block that needs no server (a version, a mistake and the error it gets) runs to its end,
    exit code 0, and prints what its comments say it prints.
    """
    process = workspace.run(block.text)
    expected = [workspace.substitute(line) for line in _expected_lines(block)]
    assert_printed(expected, process.text(), block)


def test_servers_name_their_ports_bare_or_as_endpoints() -> None:
    """
    The ports of a server's command are found whether written bare or as endpoints, in order,
    and a port 0 or an option's other number is no port of it.
    """
    command = (
        ".venv/bin/twistd -n rendezvous --listen 8080 --listen=ssl:8443:interface=::1 "
        "--metrics 9090 --listen tcp:0 --ttl 60 --max-bytes=4096 --listen 8081x"
    )
    assert ports_named(command) == [8080, 8443, 9090]


def _probe(port: int, tls: bool) -> http.client.HTTPResponse:
    if tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=5, context=context
        )
    else:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    connection.request("POST", "/", body=b"probe", headers={"Content-Type": "text/plain"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


@pytest.mark.parametrize("block", claimed_by("test_starts_and_serves"), ids=_block_id)
def test_starts_and_serves(
    block: Block, workspace: Workspace, request: pytest.FixtureRequest
) -> None:
    """
    A block that starts servers starts each one, each creates a rendezvous on every port its
    command names (metrics ports answer /health), and each stops cleanly on SIGTERM.
    """
    if _needs_redis(block):
        workspace.redis = request.getfixturevalue("redis_server")
    ports = workspace.start_servers(block)
    assert ports, f"{block.where}: no twistd -n command"
    metrics = {workspace.ports[p] for p in ("9090",) if p in workspace.ports}
    tls_ports = {int(p) for p in re.findall(r"ssl:(\d+)", workspace.substitute(block.text))}
    for port in ports:
        if port in metrics:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            health = connection.getresponse()
            assert (health.status, health.read()) == (200, b"serving\n"), block.where
            connection.close()
            continue
        answer = _probe(port, port in tls_ports)
        assert answer.status == 200, f"{block.where}: port {port} answered {answer.status}"
        assert answer.getheader("Location"), block.where
    workspace.stop_servers()


def test_the_start_command_serves(workspace: Workspace) -> None:
    """
    The README's start command is what it says (a venv, the package, twistd in the
    foreground), and its twistd serves a create at once and stops cleanly.
    """
    assert README_START.text == (
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/twistd -n rendezvous\n"
    )
    _start_as_readme_says(workspace)
    answer = _probe(workspace.ports["8080"], tls=False)
    assert answer.status == 200
    assert answer.getheader("Location", "").startswith(
        f"http://127.0.0.1:{workspace.ports['8080']}/"
    )
    workspace.stop_servers()


def test_two_terminals_with_rendezvous_cli(workspace: Workspace) -> None:
    """
    rendezvous-cli's two terminals, as docs/clients.md gives them: A creates and waits, B
    (given the URL A printed, in place of the placeholder) reads, answers and cancels, and A
    prints B's answer and exits 0.
    """
    _two_terminals(
        workspace,
        "test_two_terminals_with_rendezvous_cli",
        ("URL", r"(http://127\.0\.0\.1:\d+/[\w-]{16,})"),
        "waiting for a new payload",
    )


def test_two_terminals_with_rendezvous_cli_msc4388(workspace: Workspace) -> None:
    """
    rendezvous-cli's two terminals in MSC4388, as docs/clients.md gives them: A creates and
    waits, B (given the id A printed) reads, answers and cancels, and A prints B's answer.
    """
    _two_terminals(
        workspace,
        "test_two_terminals_with_rendezvous_cli_msc4388",
        ("ID", r"session ([\w-]{16,}) on"),
        "waiting for the other side's answer",
    )


def _two_terminals(workspace: Workspace, test: str, pasted: tuple[str, str], waiting: str) -> None:
    """
    Run the two blocks C{test} claims: terminal A in the background until it prints
    C{waiting}, then terminal B with what A printed (C{pasted}: the variable of B's first
    line, and the pattern whose group A prints it as) in place of the placeholder; B prints
    what its block shows, and A prints B's answer and exits 0.
    """
    terminal_a, terminal_b = claimed_by(test)
    variable, pattern = pasted
    _serve_for(terminal_a, workspace)
    a = Process(workspace.substitute(terminal_a.text), workspace.directory, workspace.env)
    try:
        value = a.wait_for(pattern, BLOCK_DEADLINE_SECONDS)[1]
        a.wait_for(waiting, BLOCK_DEADLINE_SECONDS)
        line = rf"(?m)^{variable}=\S+$"
        given, count = re.subn(line, f"{variable}={value}", terminal_b.text, count=1)
        assert count == 1, f"{terminal_b.where}: no {variable}=... line to paste into"
        b = workspace.run(given)
        assert_printed(_expected_lines(terminal_b), b.text(), terminal_b)
        assert a.finish(BLOCK_DEADLINE_SECONDS) == 0, a.text()
    finally:
        a.kill()
    assert "hello from B" in a.text(), a.text()
    workspace.stop_servers()


NGINX = Path("/usr/sbin/nginx")


def _request(
    port: int, method: str, url: str, body: bytes = b"", headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """
    One request over a new connection: status, headers (names lower-cased), body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=BLOCK_DEADLINE_SECONDS)
    try:
        connection.request(method, url, body=body or None, headers=dict(headers or {}))
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def homeserver_front(workspace: Workspace, port: int, locations: str, http: str = "") -> None:
    """
    nginx on C{port} as a homeserver's front: C{locations} (a docs block) in its server
    block beside the homeserver's own C{location /_matrix}, and C{http} (a docs block) in
    the http block; listening once this returns.
    """
    directory = workspace.directory
    conf = nginx_conf(
        directory,
        f"""
    access_log off;
{workspace.substitute(http)}
    server {{
        listen 127.0.0.1:{port};
        # The homeserver's own paths.
        location /_matrix {{ return 404 '{{"errcode": "M_UNRECOGNIZED"}}'; }}
{workspace.substitute(locations)}
    }}
""",
    )
    nginx = Process(
        f"exec {NGINX} -p {directory} -c {conf} -e {directory}/error.log",
        directory, workspace.env, directory / "nginx.out",
    )  # fmt: skip
    workspace.servers.append(nginx)
    workspace._wait_listening(nginx, port)


def test_a_homeserver_proxy_carries_msc4108(workspace: Workspace) -> None:
    """
    docs/deployment.md's nginx location, put in a homeserver's server block, carries a whole
    MSC4108 exchange to this server (create, read, a long-poll woken by a write, a stale
    write, delete), and the session URLs it hands out are under the homeserver's name.
    """
    (block,) = claimed_by("test_a_homeserver_proxy_carries_msc4108")
    if not NGINX.exists():
        raise RuntimeError(f"{NGINX} is missing: apt-get install nginx (as ./check does)")
    homeserver = free_port()
    base = f"http://127.0.0.1:{homeserver}"
    workspace.start_twistd(
        block,
        f"--listen tcp:8080:interface=127.0.0.1 --public-url {base}/ --trusted-proxy 127.0.0.1/32",
    )
    homeserver_front(workspace, homeserver, block.text)

    create = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"
    text = {"Content-Type": "text/plain"}
    status, headers, body = _request(homeserver, "POST", create, b"hello from A", text)
    assert status == 201, body
    url = json_url(body)
    assert url.startswith(f"{base}{create}/"), url
    path = url.removeprefix(base)
    etag_a = headers["etag"]
    status, headers, body = _request(homeserver, "GET", path)
    assert (status, body) == (200, b"hello from A")
    etag_b = headers["etag"]
    assert etag_b == etag_a

    # A long-poll parked through the proxy, woken by a write through the proxy.
    waiting = http.client.HTTPConnection("127.0.0.1", homeserver, timeout=BLOCK_DEADLINE_SECONDS)
    try:
        waiting.request("GET", path, headers={"If-None-Match": etag_a})
        status, _, _ = _request(
            homeserver, "PUT", path, b"hello from B", {**text, "If-Match": etag_b}
        )
        assert status == 202
        answer = waiting.getresponse()
        assert (answer.status, answer.read()) == (200, b"hello from B")
    finally:
        waiting.close()

    status, _, body = _request(homeserver, "PUT", path, b"late", {**text, "If-Match": etag_b})
    assert status == 412, body
    assert _request(homeserver, "DELETE", path)[0] == 204
    assert _request(homeserver, "GET", path)[0] == 404
    # The homeserver's other paths stay the homeserver's.
    assert (
        _request(homeserver, "GET", "/_matrix/client/versions")[2]
        == b'{"errcode": "M_UNRECOGNIZED"}'
    )
    workspace.stop_servers()


def test_a_homeserver_proxy_carries_msc4388_to_two_processes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """
    docs/deployment.md's Synapse recipe: its two processes on one Redis, behind its nginx
    upstream and location in a homeserver's server block, run a whole MSC4388 exchange on both
    paths, a signed-in device creating with its access token (checked against a homeserver
    stand-in where the recipe names Synapse's listener), and both processes serve it.
    """
    processes, upstream, location = claimed_by(
        "test_a_homeserver_proxy_carries_msc4388_to_two_processes"
    )
    if not NGINX.exists():
        raise RuntimeError(f"{NGINX} is missing: apt-get install nginx (as ./check does)")
    redis_server.flushall()
    workspace = Workspace(tmp_path, redis_server)
    try:
        with homeserver() as hs:
            text = processes.text.replace("http://127.0.0.1:8008", hs.url)
            assert text != processes.text, "the recipe names Synapse's listener"
            started = Block(processes.page, processes.line, "sh", text, None, None)
            assert len(workspace.start_servers(started)) == 2
            front = free_port()
            homeserver_front(workspace, front, location.text, upstream.text)

            for prefix in (UNSTABLE_PREFIX, STABLE_PREFIX):
                signed_in = ProposalClient("127.0.0.1", front, prefix, access_token=USER_TOKEN)
                new_device = ProposalClient("127.0.0.1", front, prefix)
                assert new_device.discover() is False
                whole_exchange(signed_in, new_device)
            assert _request(front, "GET", "/_matrix/client/v1/rendezvousX")[0] == 404
            assert _request(front, "GET", "/_matrix/client/versions")[0] == 404
            for server in workspace.servers[:2]:
                assert re.search(r'"(GET|PUT|POST|DELETE) /', server.text()), "one served nothing"
            workspace.stop_servers()
    finally:
        for server in workspace.servers:
            server.kill()


def json_url(body: bytes) -> str:
    value = json.loads(body)["url"]
    assert isinstance(value, str)
    return value


REDIS_SERVER = Path("/usr/bin/redis-server")


def _exchange_on(port: int) -> None:
    """
    A whole MSC3886 exchange on the server at C{port}: create, read, a
    long-poll woken by a write, a stale write refused, delete.
    """
    status, headers, body = _request(
        port, "POST", "/", b"hello from A", {"Content-Type": "text/plain"}
    )
    assert status == 200, body
    path = "/" + headers["location"].rpartition("/")[2]
    status, headers, body = _request(port, "GET", path)
    assert (status, body) == (200, b"hello from A")
    etag = headers["etag"]
    waiting = http.client.HTTPConnection("127.0.0.1", port, timeout=BLOCK_DEADLINE_SECONDS)
    try:
        waiting.request("GET", path, headers={"If-None-Match": etag})
        assert _request(port, "PUT", path, b"hello from B", {"If-Match": etag})[0] == 202
        answer = waiting.getresponse()
        assert (answer.status, answer.read()) == (200, b"hello from B")
    finally:
        waiting.close()
    assert _request(port, "PUT", path, b"late", {"If-Match": etag})[0] == 412
    assert _request(port, "DELETE", path)[0] == 204


def _redis_with(settings: str, workspace: Workspace, name: str) -> None:
    """
    A redis-server of its own on the given settings, in the workspace, up
    once it says it accepts connections.
    """
    if not REDIS_SERVER.exists():
        raise RuntimeError(
            f"{REDIS_SERVER} is missing: apt-get install redis-server (as ./check does)"
        )
    conf = workspace.directory / f"{name}.conf"
    conf.write_text(f"dir {workspace.directory}\n{settings}")
    server = Process(
        f"exec {REDIS_SERVER} {conf}", workspace.directory, workspace.env,
        workspace.directory / f"{name}.log",
    )  # fmt: skip
    workspace.servers.append(server)
    server.wait_for(r"(?i)ready to accept connections", START_DEADLINE_SECONDS)


def test_the_redis_settings_serve_an_exchange(workspace: Workspace) -> None:
    """
    docs/scaling.md's redis.conf lines start a Redis whose ACL user is allowed every command
    the store runs (a whole exchange works, and the process says it could not check the disk
    settings, as the page says); and the "One host" variant, on a UNIX socket with the
    default user given the server's rights, works too.
    """
    settings, one_host = claimed_by("test_the_redis_settings_serve_an_exchange")
    assert "user rendezvous on >SECRET" in settings.text and "requirepass" in settings.text
    port = free_port()
    _redis_with(f"port {port}\n{settings.text}", workspace, "tcp")
    process_port = workspace.start_twistd(
        settings,
        f"--listen tcp:8080:interface=127.0.0.1 --store redis://rendezvous:SECRET@127.0.0.1:{port}/0",
    )
    _exchange_on(process_port)
    assert "could not check whether Redis writes to disk" in workspace.servers[-1].text()
    workspace.stop_servers()

    # One host: the socket's group decides who connects; no requirepass, no rendezvous user.
    kept = [
        line
        for line in settings.text.splitlines()
        if not line.startswith(("requirepass", "user rendezvous"))
    ]
    socket_path = workspace.directory / "redis.sock"
    unix = f"port 0\nunixsocket {socket_path}\nunixsocketperm 770\n"
    _redis_with(unix + "\n".join(kept) + "\n" + one_host.text, workspace, "unix")
    process_port = workspace.start_twistd(
        one_host, f"--listen tcp:8081:interface=127.0.0.1 --store unix://{socket_path}"
    )
    _exchange_on(process_port)
    workspace.stop_servers()


_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} (?P<title>.+)$")


def anchors_of(page: Path) -> set[str]:
    """
    The anchors GitHub makes of a page's headings: lower case, punctuation
    but hyphens dropped, spaces as hyphens.
    """
    anchors = set()
    in_fence = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            title = re.sub(r"[^\w\- ]", "", heading["title"].strip().lower())
            anchors.add(title.replace(" ", "-"))
    return anchors


def test_links_between_pages_resolve() -> None:
    """
    Every relative link of README.md and docs/*.md names a file of the repository, and every
    #anchor a heading of the page it points to.
    """
    faults = []
    for page in PAGES:
        for match in _LINK.finditer(page.read_text(encoding="utf-8")):
            target = match["target"]
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                faults.append(f"{page.name}: {target}: no such file")
            elif anchor and anchor not in anchors_of(linked):
                faults.append(f"{page.name}: {target}: no such heading")
    assert not faults, "\n".join(faults)
