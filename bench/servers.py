"""
The servers a benchmark run starts (C{twistd rendezvous} and the bare
C{twisted.web} floor), pinned to one core, and what is read of them from
/proc: CPU time, resident memory, and the port they listen on.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Generous: a loaded two-core machine may take a few seconds to import Twisted.
START_DEADLINE_SECONDS = 30.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

#: The limits the benchmark serves with: high enough that no cap refuses
#: the load (every request comes from 127.0.0.1, one address), and a poll
#: timeout longer than any parked round.
BENCH_LIMITS = (
    "--max-rendezvous=100000",
    "--max-rendezvous-per-address=100000",
    "--max-parked=100000",
    "--max-parked-per-rendezvous=8",
    # The load comes from one address at rates no client would reach: lift
    # the per-client rate limits and connection caps.
    "--create-burst=1000000",
    "--create-per-second=1000000",
    "--request-burst=1000000",
    "--request-per-second=1000000",
    "--max-connections=100000",
    "--max-connections-per-address=100000",
    # The parked rounds open every connection before sending a request.
    "--header-timeout=600",
    "--poll-timeout=600",
    # A scenario's set-up connection waits, idle, through its load phases
    # (read-heavy's 304 phase found it closed after --idle-timeout's 15 s).
    "--idle-timeout=600",
    # Longer than any parked round: its rendezvous must outlive it.
    "--ttl=3600",
)


def raise_nofile() -> int:
    """
    Raise this process' open-file limit to its hard limit; return it.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Probe:
    """
    CPU time and resident memory of a process, read from /proc.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_seconds(self) -> float:
        """
        User plus system CPU time the process has used so far.
        """
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            stat = f.read()
        # The command name may hold spaces; fields resume after its ")".
        fields = stat[stat.rindex(b")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE

    def listening_port(self) -> int | None:
        """
        The TCP port this process listens on, if any yet.
        """
        inodes: set[bytes] = set()
        try:
            for fd in os.listdir(f"/proc/{self.pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1].encode("ascii"))
        except OSError:
            return None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table, "rb") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == b"0A" and fields[9] in inodes:
                        return int(fields[1].rsplit(b":", 1)[1], 16)
        return None


class Probes:
    """
    The sum of several processes' CPU time (the server processes of one
    setup and the Redis they share), read as one L{Probe}.
    """

    def __init__(self, probes: Sequence[Probe]) -> None:
        self.probes = list(probes)

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.probes)

    def rss_bytes(self) -> int:
        return sum(p.rss_bytes() for p in self.probes)


def connections_drained(port: int, count: int) -> bool:
    """
    Whether at least C{count} established connections to local C{port} have
    nothing left unread in their receive queue: the server has read (and,
    as it handles each request as it reads it, handled) every request sent.
    """
    hex_port = b":%04X" % port
    drained = 0
    with open("/proc/net/tcp", "rb") as f:
        next(f)
        for line in f:
            fields = line.split()
            established = fields[3] == b"01" and fields[1].endswith(hex_port)
            if established and fields[4].endswith(b":00000000"):
                drained += 1
    return drained >= count


class Server:
    """
    A server process started by the benchmark, its port and its probe.
    Its output goes to a temporary file, shown if it fails to start.
    """

    def __init__(
        self, name: str, argv: Sequence[str], cpu: int | None, discard_stdout: bool = False
    ) -> None:
        self.name = name
        prefix: list[str] = []
        if cpu is not None:
            taskset = shutil.which("taskset")
            if taskset is None:
                raise RuntimeError("pinning needs taskset (util-linux); or pass --no-pin")
            prefix = [taskset, "-c", str(cpu)]
        # Kept open for the server's life, closed by stop().
        self._output = tempfile.TemporaryFile()  # noqa: SIM115
        environ = {k: v for k, v in os.environ.items() if not k.startswith("RENDEZVOUS_")}
        environ["PYTHONPATH"] = str(REPO)
        self.argv = [*prefix, *argv]
        self._discard_stdout = discard_stdout
        self.proc = subprocess.Popen(  # noqa: S603 - our own argv
            self.argv,
            cwd=tempfile.gettempdir(),
            env=environ,
            stdin=subprocess.DEVNULL,
            # A server logging to standard output would fill the file: its
            # log goes to the null device, opened here, never named to it.
            stdout=subprocess.DEVNULL if discard_stdout else self._output,
            stderr=self._output if discard_stdout else subprocess.STDOUT,
            # Its own open-file limit at the hard limit, for the parked rounds.
            preexec_fn=raise_nofile,
        )
        self.probe = Probe(self.proc.pid)
        self.port = 0
        self.url = ""

    def ready(self) -> Server:
        """
        Wait until the server listens (started servers import Twisted in
        parallel, so start them all first); return it.
        """
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            port = self.probe.listening_port()
            if port is not None:
                return port
            time.sleep(0.02)
        output = self.stop()
        lost = " (standard output discarded: run it by hand to see it)" * self._discard_stdout
        raise RuntimeError(f"{self.name} did not start listening{lost}: {self.argv}\n{output}")

    def output(self) -> str:
        self._output.seek(0)
        return self._output.read().decode("utf-8", "replace")

    def stop(self, grace_seconds: float = 10.0) -> str:
        """
        Stop the server (SIGTERM, SIGKILL if it outlives C{grace_seconds})
        and return all it printed, what it logged as it stopped included;
        its output file is closed.  Safe to call twice.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._output.closed:
            return ""
        output = self.output()
        self._output.close()
        return output


def start_rendezvous(cpu: int | None, *limits: str) -> Server:
    """
    Start C{twistd -n rendezvous} of this working tree on tcp:0, logging to
    standard output, which is the null device (the access log is still
    formatted and written, as in production), with the benchmark's limits
    and then C{limits}, which win.  Its port is read from /proc, not from
    its log.
    """
    twistd = Path(sys.executable).parent / "twistd"
    # Not --logfile=/dev/null: twistd's LogFile rotates at 1 MB by renaming
    # its file, which on a long run renames the null device itself (to
    # /dev/null.1) and leaves a regular file in its place.  twistd never
    # rotates standard output.  The cost: what twistd prints before failing
    # to start is lost (only standard error is kept); the error names the
    # command, to be run by hand.
    argv = [
        str(twistd), "-n", "--pidfile=", "--logfile=-",
        "rendezvous", "--listen=tcp:0:interface=127.0.0.1", *BENCH_LIMITS, *limits,
    ]  # fmt: skip
    return Server("twistd rendezvous", argv, cpu, discard_stdout=True)


def start_floor(cpu: int | None) -> Server:
    """
    Start the bare twisted.web hello-world of L{bench.floor}.
    """
    return Server("floor", [sys.executable, "-m", "bench.floor"], cpu)


def free_port() -> int:
    """
    A TCP port on the loopback that nothing listens on now (the kernel's
    choice; taken by the caller's process a moment later).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start_redis(redis_server: str, cpu: int | None) -> Server:
    """
    Start a redis-server on a free loopback port with the settings README
    gives for the store: nothing ever written to disk.
    """
    port = free_port()
    argv = [
        redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--maxmemory", "1gb", "--maxmemory-policy", "noeviction",
    ]  # fmt: skip
    return Server("redis-server", argv, cpu)
