"""
Several server processes on one Redis: real C{twistd rendezvous --store
redis://...} processes sharing the session's redis-server, and, in front of
them, Debian's real nginx as a plain round-robin balancer with no sticky
sessions, so that every request of an exchange lands on another process.

Nothing sleeps: a reader is known to be parked when its process' metrics
say so (polled, with a deadline), and every other wait is on a socket or a
pipe, with a deadline.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .redis_server import RedisServer, free_port, terminate
from .test_end_to_end import (
    HOST,
    LISTEN,
    Conn,
    Response,
    TwistdServer,
    create,
    etag_of,
    running,
    secret,
)
from .test_metrics import get, samples, value

REPO = Path(__file__).resolve().parent.parent
NGINX = Path("/usr/sbin/nginx")
#: The balancer config that docs/scaling.md documents; rendered for the test.
CONTRIB_NGINX = REPO / "contrib" / "nginx" / "rendezvous-twisted.conf"

#: Long enough that no parked reader here times out by itself.
POLL_TIMEOUT_SECONDS = 10
#: What every node runs with: these tests make many requests from one
#: address, so rate limits (per node, tested in test_abuse.py) stay out of
#: the way; and a metrics port, to see parked readers and health.
NODE_OPTIONS = (
    f"--poll-timeout={POLL_TIMEOUT_SECONDS}",
    "--create-burst=10000",
    "--request-burst=100000",
    "--max-rendezvous-per-address=500",
    "--metrics",
    f"tcp:0:interface={HOST}",
)
#: A cross-node wake must arrive well before the poll timeout; on loopback
#: it takes milliseconds.
WAKE_BOUND_SECONDS = 1.0
#: How long a poll of metrics, health or a port waits between two tries.
POLL_SECONDS = 0.01
#: If-Match races run this many rounds.
RACE_ROUNDS = 30

_METRICS_PORT = re.compile(rb"\] Site starting on (\d+)")


@dataclass
class Node:
    """
    One server process of several, and its metrics port.
    """

    server: TwistdServer
    metrics_port: int

    @property
    def port(self) -> int:
        return self.server.port

    def parked(self) -> float:
        """
        How many readers are parked on this process now.
        """
        status, text = get(self.metrics_port, "/metrics")
        assert status == 200, text
        return value(samples(text), "rendezvous_parked_readers")

    def health(self) -> int:
        return get(self.metrics_port, "/health")[0]

    def alive(self) -> bool:
        return self.server.proc.poll() is None


@contextmanager
def start_nodes(
    store_urls: Sequence[str], cwd: Path, *options: str, healthy: bool = True
) -> Iterator[list[Node]]:
    """
    Start one process on each of C{store_urls}, side by side, and unless told
    otherwise wait until their /health says they reach Redis (they listen
    before); stop them all afterwards, and fail if one did not exit
    cleanly, logged a failure, or logged an id or a payload.
    """
    with ExitStack() as stack:
        servers = []
        for store_url in store_urls:
            server = TwistdServer(
                ["rendezvous", "--listen", LISTEN, "--store", store_url, *NODE_OPTIONS, *options],
                cwd,
                wait=False,
            )
            stack.enter_context(contextmanager(running)(server))
            servers.append(server)
        nodes = []
        for server in servers:
            server.wait_started()
            metrics_port = int(server.wait_for(_METRICS_PORT, 10).group(1))
            nodes.append(Node(server, metrics_port))
        if healthy:
            wait_until(lambda: all(n.health() == 200 for n in nodes), "healthy", nodes)
        yield nodes


def hide(nodes: list[Node], *values: bytes | str) -> None:
    """
    None of C{values} (ids, payloads) may ever appear in any node's log.
    """
    for node in nodes:
        node.server.secrets += [v.encode("ascii") if isinstance(v, str) else v for v in values]


def hidden(nodes: list[Node], label: str) -> bytes:
    """
    A fresh payload, which no node may log.
    """
    payload = secret(label)
    hide(nodes, payload)
    return payload


def wait_until(
    condition: Callable[[], bool], what: str, nodes: list[Node], timeout: float = 5.0
) -> float:
    """
    Poll C{condition} until it holds; between two tries wait up to
    POLL_SECONDS for the nodes' output (reading it, so their pipes never
    fill).  The seconds it took; fails after C{timeout}.
    """
    started = time.monotonic()
    deadline = started + timeout
    for _ in range(100_000):
        if condition():
            return time.monotonic() - started
        if time.monotonic() > deadline:
            break
        for node in nodes:
            node.server.pump(POLL_SECONDS / len(nodes))
    raise AssertionError(f"not {what} after {timeout}s")


def wait_parked(node: Node, count: int) -> None:
    wait_until(lambda: node.parked() == count, f"{count} parked", [node])


def exchange_across(writer: Node, reader: Node, nodes: list[Node]) -> float:
    """
    A whole exchange with the writer on one node and the reader on another:
    create, read, park, write (which wakes the parked reader on the other
    node), delete, and a 404 after.  Returns the wake latency: from sending
    the PUT to the parked reader's answer.
    """
    with Conn(writer.port) as w, Conn(reader.port) as r:
        offer = hidden(nodes, "offer")
        rendezvous_id, _ = create(writer.server, w, offer)
        hide(nodes, rendezvous_id)
        path = "/" + rendezvous_id
        read = r.exchange("GET", path)
        assert (read.status, read.body) == (200, offer)
        parked_before = reader.parked()
        r.request("GET", path, [("If-None-Match", etag_of(read)), ("Prefer", "wait=10")])
        wait_parked(reader, int(parked_before) + 1)
        answer = hidden(nodes, "answer")
        started = time.monotonic()
        w.request("PUT", path, [("If-Match", etag_of(read))], answer)
        woken = r.read_response(timeout=POLL_TIMEOUT_SECONDS + 5)
        latency = time.monotonic() - started
        accepted = w.read_response()
        assert accepted.status == 202, (accepted.head, accepted.body)
        assert (woken.status, woken.body) == (200, answer), (woken.head, woken.body)
        assert etag_of(woken) == etag_of(accepted)
        assert r.exchange("DELETE", path).status == 204
        w.exchange("GET", path).assert_error(404, "M_NOT_FOUND")
    return latency


@pytest.fixture(scope="module")
def nodes(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Node]]:
    """
    Two processes sharing the session's redis-server, for the whole module.
    """
    redis_server.flushall()
    with start_nodes([redis_server.url] * 2, tmp_path_factory.mktemp("nodes")) as started:
        yield started


def test_put_on_one_node_wakes_a_reader_parked_on_another(
    nodes: list[Node], record_property: Callable[[str, object], None]
) -> None:
    """
    A PUT on node A answers a reader parked on node B with the new payload
    within milliseconds (through Redis pub/sub), in both directions.
    """
    a, b = nodes
    latencies = sorted(exchange_across(*pair, nodes) for pair in [(a, b), (b, a)] * 5)
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    record_property("cross_node_wake_median_seconds", median)
    record_property("cross_node_wake_max_seconds", worst)
    print(f"cross-node wake: median {median * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    assert worst < WAKE_BOUND_SECONDS, latencies


def test_a_put_racing_a_park_on_another_node_is_never_lost(nodes: list[Node]) -> None:
    """
    A conditional GET sent to B at the same moment as a PUT to A gets the
    new payload at once or woken, never a 304 after the poll timeout.
    """
    a, b = nodes
    with Conn(a.port) as on_a, Conn(b.port) as on_b:
        rendezvous_id, created = create(a.server, on_a, hidden(nodes, "start"))
        hide(nodes, rendezvous_id)
        path, etag = "/" + rendezvous_id, etag_of(created)
        for round_ in range(RACE_ROUNDS):
            writer, reader = (on_a, on_b) if round_ % 2 else (on_b, on_a)
            payload = hidden(nodes, f"round{round_}")
            started = time.monotonic()
            reader.request("GET", path, [("If-None-Match", etag), ("Prefer", "wait=5")])
            writer.request("PUT", path, [("If-Match", etag)], payload)
            accepted = writer.read_response()
            got = reader.read_response(timeout=10)
            assert accepted.status == 202, (accepted.head, accepted.body)
            assert (got.status, got.body) == (200, payload), (round_, got.head, got.body)
            assert time.monotonic() - started < WAKE_BOUND_SECONDS
            etag = etag_of(accepted)
        assert on_a.exchange("DELETE", path).status == 204


def test_if_match_race_across_nodes_has_exactly_one_winner(nodes: list[Node]) -> None:
    """
    Writers on two nodes racing with the same If-Match: in every round
    exactly one gets 202 and every other 412 with the winner's ETag, and
    the winner's payload is what everyone reads.
    """
    with ExitStack() as stack:
        # Two writers per node, each on its own connection.
        writers = [(node, stack.enter_context(Conn(node.port))) for node in nodes for _ in range(2)]
        wins = {node.port: 0 for node in nodes}
        reader = stack.enter_context(Conn(nodes[1].port))
        rendezvous_id, created = create(nodes[0].server, writers[0][1], hidden(nodes, "start"))
        hide(nodes, rendezvous_id)
        path, etag = "/" + rendezvous_id, etag_of(created)
        for round_ in range(RACE_ROUNDS):
            payloads = [hidden(nodes, f"w{i}r{round_}") for i in range(len(writers))]
            # Every request is on the wire before any answer is read; the
            # order of sending turns each round.
            order = [(i + round_) % len(writers) for i in range(len(writers))]
            for i in order:
                writers[i][1].request("PUT", path, [("If-Match", etag)], payloads[i])
            answers = {i: writers[i][1].read_response() for i in order}
            statuses = sorted(answer.status for answer in answers.values())
            assert statuses == [202] + [412] * (len(writers) - 1), [
                (r.head, r.body) for r in answers.values()
            ]
            [(winner, won)] = [(i, r) for i, r in answers.items() if r.status == 202]
            for lost in answers.values():
                assert etag_of(lost) == etag_of(won)
            wins[writers[winner][0].port] += 1
            etag = etag_of(won)
            now = reader.exchange("GET", path)
            assert (now.status, now.body, etag_of(now)) == (200, payloads[winner], etag)
        assert reader.exchange("DELETE", path).status == 204
    print(f"If-Match race: wins per node {sorted(wins.values())}")


def test_delete_on_one_node_answers_a_reader_parked_on_another(nodes: list[Node]) -> None:
    """
    A DELETE on node B answers a reader parked on node A with 404 at once.
    """
    a, b = nodes
    with Conn(a.port) as reader, Conn(b.port) as deleter:
        rendezvous_id, created = create(a.server, reader, hidden(nodes, "doomed"))
        hide(nodes, rendezvous_id)
        path = "/" + rendezvous_id
        reader.request("GET", path, [("If-None-Match", etag_of(created))])
        wait_parked(a, 1)
        started = time.monotonic()
        assert deleter.exchange("DELETE", path).status == 204
        reader.read_response(timeout=5).assert_error(404, "M_NOT_FOUND")
        assert time.monotonic() - started < WAKE_BOUND_SECONDS
        assert a.parked() == 0


def test_expiry_answers_a_reader_parked_on_another_node(
    nodes: list[Node], redis_server: RedisServer, tmp_path: Path
) -> None:
    """
    A rendezvous made by a process with a one-second TTL expires for a
    reader parked on another process (404 at its Expires, not at the poll
    timeout), and for every process after.
    """
    with start_nodes([redis_server.url], tmp_path, "--ttl=1") as [short]:
        everyone = [*nodes, short]
        with Conn(short.port) as writer, Conn(nodes[1].port) as reader:
            rendezvous_id, created = create(short.server, writer, hidden(everyone, "brief"))
            hide(everyone, rendezvous_id)
            path = "/" + rendezvous_id
            reader.request("GET", path, [("If-None-Match", etag_of(created))])
            wait_parked(nodes[1], 1)
            parked = time.monotonic()
            reader.read_response(timeout=5).assert_error(404, "M_NOT_FOUND")
            waited = time.monotonic() - parked
        for node in everyone:
            with Conn(node.port) as conn:
                conn.exchange("GET", path).assert_error(404, "M_NOT_FOUND")
    # At the expiry, under a second after the creation; not at the poll
    # timeout (10 s).
    assert waited < 1.5, waited


def test_nodes_on_a_unix_socket_and_on_tls_share_one_redis(tmp_path: Path) -> None:
    """
    A process on Redis' unix socket (unix://) and one on its TLS port
    (rediss://, trusting a private CA) serve one exchange between them.
    """
    with (
        RedisServer(tls=True) as redis,
        start_nodes([redis.unix_url, redis.tls_url], tmp_path) as nodes,
    ):
        on_unix, on_tls = nodes
        exchange_across(on_unix, on_tls, nodes)
        exchange_across(on_tls, on_unix, nodes)


# Behind a real nginx.


def _test_only_config(upstreams: list[int], port: int) -> str:
    """
    A minimal server block, used until contrib/nginx/rendezvous-twisted.conf
    exists; it has what the test needs of that file (see below).
    """
    servers = "".join(f"server {HOST}:{p};\n" for p in upstreams)
    return f"""
upstream rendezvous_twisted {{
    {servers}
    keepalive 8;
}}
server {{
    listen {HOST}:{port};
    location / {{
        proxy_pass http://rendezvous_twisted;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_buffering off;
        proxy_read_timeout 60s;
    }}
}}
"""


def render_contrib_config(text: str, upstreams: list[int], port: int) -> str:
    """
    contrib/nginx/rendezvous-twisted.conf with the test's processes between
    its "# BEGIN upstream servers" and "# END upstream servers" lines, and
    the test's port in its one "listen 8080;".
    """
    servers = "".join(f"    server {HOST}:{p};\n" for p in upstreams)
    text, count = re.subn(
        r"(?ms)^\s*# BEGIN upstream servers.*?# END upstream servers[^\n]*\n",
        lambda _: servers,
        text,
    )
    assert count == 1, "contrib/nginx: no single BEGIN/END upstream servers block"
    text, count = re.subn(r"(?m)^(\s*)listen 8080;", rf"\1listen {HOST}:{port};", text)
    assert count == 1, "contrib/nginx: no single 'listen 8080;' line"
    return text


def nginx_conf(directory: Path, http: str) -> Path:
    """
    Write C{directory}/nginx.conf for Debian's nginx run in the foreground
    by any user: one process, its PID file, its error log (C{error.log}) and
    its temporary files in C{directory}, and C{http} in its http block.
    Returns the file's path.
    """
    for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / name).mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
{http}
}}
""")
    return conf


class Nginx:
    """
    Debian's nginx in the foreground, one process, its prefix, logs and
    temporary files in C{directory}, balancing C{upstreams} round-robin.
    Every answer carries X-Upstream: the process that answered it.
    """

    def __init__(self, directory: Path, upstreams: list[int]) -> None:
        if not NGINX.exists():
            raise RuntimeError(f"{NGINX} is missing: apt-get install nginx (as .ci/run does)")
        self.directory = directory
        self.port = free_port()
        if CONTRIB_NGINX.exists():
            self.source = str(CONTRIB_NGINX.relative_to(REPO))
            site = render_contrib_config(CONTRIB_NGINX.read_text(), upstreams, self.port)
        else:
            self.source = "the test's own config"
            site = _test_only_config(upstreams, self.port)
        (directory / "site.conf").write_text(site)
        conf = nginx_conf(
            directory,
            f"""
    access_log {directory}/access.log;
    # Inherited by every location that sets no header of its own.
    add_header X-Upstream $upstream_addr always;
    include {directory}/site.conf;
""",
        )
        self.error_log = directory / "error.log"
        self.proc = subprocess.Popen(
            [str(NGINX), "-p", str(directory), "-c", str(conf), "-e", str(self.error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        for _ in range(100_000):
            try:
                Conn(self.port, timeout=1).close()
                return
            except ConnectionRefusedError:
                pass
            try:
                self.proc.wait(timeout=POLL_SECONDS)
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
            break
        self.stop()
        raise RuntimeError(f"nginx did not start; its error log:\n{self.log()}")

    def log(self) -> str:
        return self.error_log.read_text() if self.error_log.exists() else ""

    def stop(self) -> None:
        terminate(self.proc)


@pytest.fixture
def nginx(nodes: list[Node], tmp_path: Path) -> Iterator[Nginx]:
    balancer = Nginx(tmp_path, [node.port for node in nodes])
    try:
        yield balancer
    finally:
        balancer.stop()
    assert "[alert]" not in balancer.log() and "[emerg]" not in balancer.log(), balancer.log()


def test_exchange_through_round_robin_nginx_lands_on_every_node(
    nodes: list[Node], nginx: Nginx
) -> None:
    """
    Behind nginx's plain round-robin (no sticky sessions) a complete
    exchange works while each request lands on another process than the
    one before: the parked read on one, the PUT that wakes it on the other.
    """
    landed: list[tuple[str, bytes]] = []

    def on(label: str, response: Response) -> Response:
        upstream = response.header("X-Upstream")
        assert upstream is not None, response.head
        landed.append((label, upstream))
        return response

    with Conn(nginx.port) as device_a, Conn(nginx.port) as device_b:
        offer = hidden(nodes, "offer")
        created = on("create", device_a.exchange("POST", "/", body=offer))
        assert created.status == 200, (created.head, created.body)
        rendezvous_id = created.json()["id"]
        hide(nodes, rendezvous_id)
        path = "/" + rendezvous_id
        read = on("read", device_b.exchange("GET", path))
        assert (read.status, read.body) == (200, offer)

        device_b.request("GET", path, [("If-None-Match", etag_of(read)), ("Prefer", "wait=10")])
        wait_until(lambda: sum(n.parked() for n in nodes) == 1, "parked", nodes)
        answer = hidden(nodes, "answer")
        accepted = on(
            "wake-put", device_a.exchange("PUT", path, [("If-Match", etag_of(read))], answer)
        )
        assert accepted.status == 202
        woken = on("parked-read", device_b.read_response())
        assert (woken.status, woken.body) == (200, answer)

        confirm = hidden(nodes, "confirm")
        stale = on("stale-put", device_b.exchange("PUT", path, [("If-Match", etag_of(read))], b"x"))
        stale.assert_error(412)
        assert etag_of(stale) == etag_of(accepted)
        put = device_b.exchange("PUT", path, [("If-Match", etag_of(accepted))], confirm)
        assert on("conditional-put", put).status == 202
        final = on("final-read", device_a.exchange("GET", path))
        assert (final.status, final.body) == (200, confirm)
        assert on("delete", device_a.exchange("DELETE", path)).status == 204
        on("after-delete", device_b.exchange("GET", path)).assert_error(404, "M_NOT_FOUND")

    # In the order nginx got them (the parked read before the PUT that
    # woke it), no two consecutive requests went to the same process.
    arrival = ["create", "read", "parked-read", "wake-put"]
    arrival += [label for label, _ in landed if label not in arrival]
    upstream = dict(landed)
    sequence = [upstream[label] for label in arrival]
    print(f"nginx ({nginx.source}): " + ", ".join(f"{k}->{upstream[k].decode()}" for k in arrival))
    assert all(x != y for x, y in itertools.pairwise(sequence)), sequence
    assert {u.decode() for u in sequence} == {f"{HOST}:{node.port}" for node in nodes}
