"""
The scenarios of issue 6.  Each is a coroutine that loads a server at a base
URL for a bounded time and returns one flat dict of figures (the JSON line
the runner prints).  Times are milliseconds; rates are per second.

When a L{Probe} of the server process is given, every scenario reports the
server's CPU share over its measured window (1.0 is one core saturated), and
the client's own share, so a reader sees which side was the bottleneck.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.client import (
    REFUSALS,
    BenchError,
    Connection,
    Refused,
    Response,
    Target,
    close_all,
    percentile,
)
from bench.servers import Probe, Probes, connections_drained

Figures = dict[str, Any]
#: One process or several read as one (a setup's servers and their Redis).
ProbeLike = Probe | Probes
TEXT = b"Content-Type: text/plain\r\n"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _expect(response: Response, status: int, what: str) -> Response:
    if response.status != status:
        if response.status in REFUSALS:
            raise Refused.of(response.status, response.body)
        raise BenchError(f"{what}: expected {status}, got {response.head!r} {response.body!r}")
    return response


@dataclass
class Window:
    """
    The wall time and the server's and client's CPU time over a measured
    stretch of a scenario.
    """

    probe: ProbeLike | None
    started: float = field(default_factory=time.perf_counter)
    client_cpu: float = field(default_factory=time.process_time)
    server_cpu: float = 0.0

    part_cpu: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.probe is not None:
            self.server_cpu = self.probe.cpu_seconds()
        if isinstance(self.probe, Probes):
            self.part_cpu = [p.cpu_seconds() for p in self.probe.probes]

    def close(self) -> Figures:
        elapsed = time.perf_counter() - self.started
        figures: Figures = {
            "elapsed_s": round(elapsed, 3),
            "client_cpu_share": round((time.process_time() - self.client_cpu) / elapsed, 3),
        }
        if self.probe is not None:
            used = self.probe.cpu_seconds() - self.server_cpu
            figures["server_cpu_share"] = round(used / elapsed, 3)
        if isinstance(self.probe, Probes):
            figures["server_cpu_shares"] = [
                round((p.cpu_seconds() - before) / elapsed, 3)
                for p, before in zip(self.probe.probes, self.part_cpu, strict=True)
            ]
        return figures


def _cpu_per_request(window: Figures, requests: int) -> Figures:
    """
    The server's CPU time per request, in microseconds: unlike requests/s,
    it does not drop when other processes take turns on the server's core,
    so it is the steadier figure on a shared machine.
    """
    share = window.get("server_cpu_share")
    if share is None or not requests:
        return {}
    return {"server_cpu_us_per_request": round(share * window["elapsed_s"] / requests * 1e6, 1)}


async def _create(connection: Connection, body: bytes = b"hello from A") -> tuple[bytes, bytes]:
    """
    Create a rendezvous; return its path and ETag.
    """
    response = _expect(await connection.request(b"POST", b"/", TEXT, body), 200, "create")
    rendezvous_id = json.loads(response.body)["id"].encode("ascii")
    etag = response.header(b"ETag")
    assert etag is not None
    return b"/" + rendezvous_id, etag


#: Requests in one two-device flow, as the issue lists them: A creates, A
#: long-polls, B reads, B writes (waking A), A writes, B reads again, A
#: deletes.
REQUESTS_PER_FLOW = 7
#: The request of a flow that parks, and the write that wakes it.
PARKED, WAKING = 1, 3


def route(processes: int, offset: int) -> list[int]:
    """
    The process each request of one flow goes to, for a flow that starts on
    process C{offset}: each request to the next process, round-robin, as a
    balancer without sticky sessions may send them; except that B's write
    always goes to another process than A's parked read, so that with two
    processes or more every wake crosses processes.
    """
    chosen = [(offset + i) % processes for i in range(REQUESTS_PER_FLOW)]
    if processes > 1 and chosen[WAKING] == chosen[PARKED]:
        chosen[WAKING] = (chosen[PARKED] + 1) % processes
    return chosen


async def _one_flow(
    a: Sequence[Connection],
    b: Sequence[Connection],
    to: Sequence[int],
    wakes: list[float],
    puts: list[float],
) -> None:
    """
    One two-device exchange, seven requests, as the issue lists them.
    C{a} and C{b} hold each device's connection to every process, and
    request C{i} goes to process C{to[i]}.
    """
    path, etag = await _create(a[to[0]])
    # A long-polls; it is on the wire before B's first request is sent, so
    # it is parked before B writes (if not, it answers 200 at once: no harm).
    parked = a[to[PARKED]].send(b"GET", path, b"If-None-Match: " + etag + b"\r\n")
    seen = _expect(await b[to[2]].request(b"GET", path), 200, "B reads")
    seen_etag = seen.header(b"ETag")
    assert seen_etag is not None
    put_sent = time.perf_counter()
    accepted = _expect(
        await b[to[WAKING]].request(
            b"PUT", path, TEXT + b"If-Match: " + seen_etag + b"\r\n", b"from B"
        ),
        202,
        "B writes",
    )
    woken = _expect(await parked, 200, "A's long-poll")
    # The server answers the parked GET inside B's write, before the 202,
    # so this is often zero or below: the measure, kept as asked.
    wakes.append(woken.arrived - accepted.arrived)
    puts.append(woken.arrived - put_sent)
    woken_etag = woken.header(b"ETag")
    assert woken_etag is not None
    _expect(
        await a[to[4]].request(
            b"PUT", path, TEXT + b"If-Match: " + woken_etag + b"\r\n", b"from A"
        ),
        202,
        "A writes",
    )
    _expect(await b[to[5]].request(b"GET", path), 200, "B reads again")
    _expect(await a[to[6]].request(b"DELETE", path), 204, "A deletes")


async def _flows(
    targets: Sequence[Target], in_flight: int, seconds: float, probe: ProbeLike | None
) -> Figures:
    processes = len(targets)
    routes = [route(processes, offset) for offset in range(processes)]
    pairs = [
        ([await t.connect() for t in targets], [await t.connect() for t in targets])
        for _ in range(in_flight)
    ]
    wakes: list[float] = []
    puts: list[float] = []
    count = 0
    window = Window(probe)
    deadline = time.perf_counter() + seconds

    async def run(index: int, a: list[Connection], b: list[Connection]) -> None:
        nonlocal count
        offset = index
        while time.perf_counter() < deadline:
            await _one_flow(a, b, routes[offset % processes], wakes, puts)
            offset += 1
            count += 1

    await asyncio.gather(*(run(i, a, b) for i, (a, b) in enumerate(pairs)))
    figures = window.close()
    close_all([c for a, b in pairs for c in (*a, *b)])
    elapsed = figures["elapsed_s"]
    return {
        **_cpu_per_request(figures, count * REQUESTS_PER_FLOW),
        "flows_in_flight": in_flight,
        "flows": count,
        "flows_per_s": round(count / elapsed, 1),
        "requests_per_s": round(count * REQUESTS_PER_FLOW / elapsed, 1),
        "wake_after_202_ms_p50": _ms(percentile(wakes, 0.5)),
        "wake_after_202_ms_p99": _ms(percentile(wakes, 0.99)),
        "wake_after_put_sent_ms_p50": _ms(percentile(puts, 0.5)),
        "wake_after_put_sent_ms_p99": _ms(percentile(puts, 0.99)),
        **figures,
    }


async def exchange(targets: Sequence[Target], seconds: float, probe: ProbeLike | None) -> Figures:
    """
    32 two-device flows in flight for C{seconds}, then one at a time for as
    long (the unloaded latency).  With several targets (processes sharing
    one store), each flow's requests go round-robin over them (L{route}).
    """
    loaded = await _flows(targets, 32, seconds, probe)
    unloaded = await _flows(targets, 1, seconds, probe)
    return {
        "scenario": "exchange",
        **loaded,
        **{"unloaded_" + name: value for name, value in unloaded.items()},
    }


async def until_serving(target: Target, seconds: float) -> None:
    """
    Wait until the server at C{target} creates a rendezvous (a server on a
    shared store answers 503 until its store is connected); delete it.
    """
    deadline = time.perf_counter() + seconds
    last = "no answer"
    while time.perf_counter() < deadline:
        try:
            connection = await target.connect()
            response = await connection.request(b"POST", b"/", TEXT, b"ready?")
        except OSError as e:
            last = repr(e)
        else:
            if response.status == 200:
                rendezvous_id = json.loads(response.body)["id"].encode("ascii")
                _expect(await connection.request(b"DELETE", b"/" + rendezvous_id), 204, "delete")
                connection.reset()
                return
            last = response.head.decode("ascii", "replace")
            connection.reset()
        await asyncio.sleep(0.05)
    raise BenchError(f"{target.url} did not serve within {seconds:g} s: {last}")


async def _hammer(
    connections: list[Connection],
    seconds: float,
    probe: Probe | None,
    request: Callable[[Connection, int], Awaitable[Response]],
    status: int,
) -> Figures:
    """
    Every connection sends C{request(connection, i)} back to back for
    C{seconds}; report requests/s and latency.
    """
    latencies: list[list[float]] = [[] for _ in connections]
    window = Window(probe)
    deadline = time.perf_counter() + seconds

    async def run(index: int, connection: Connection) -> None:
        mine = latencies[index]
        i = index
        while True:
            sent = time.perf_counter()
            if sent >= deadline:
                return
            response = await request(connection, i)
            if response.status != status:
                _expect(response, status, "a request")
            mine.append(response.arrived - sent)
            i += 1

    await asyncio.gather(*(run(i, c) for i, c in enumerate(connections)))
    figures = window.close()
    every = [x for mine in latencies for x in mine]
    return {
        "requests": len(every),
        "requests_per_s": round(len(every) / figures["elapsed_s"], 1),
        **_cpu_per_request(figures, len(every)),
        "latency_ms_p50": _ms(percentile(every, 0.5)),
        "latency_ms_p99": _ms(percentile(every, 0.99)),
        **figures,
    }


READ_RENDEZVOUS = 100
READ_CONNECTIONS = 64


async def read_heavy(target: Target, seconds: float, probe: Probe | None) -> Figures:
    """
    GET 200, then conditional GET with C{Prefer: wait=0} (304), on 100
    rendezvous over 64 connections, C{seconds} each.
    """
    setup = await target.connect()
    made = [await _create(setup, b"x" * 100) for _ in range(READ_RENDEZVOUS)]
    paths = [path for path, _ in made]
    conditional = [b"If-None-Match: " + etag + b"\r\nPrefer: wait=0\r\n" for _, etag in made]
    connections = await target.connect_many(READ_CONNECTIONS)

    def get(connection: Connection, i: int) -> Awaitable[Response]:
        return connection.send(b"GET", paths[i % READ_RENDEZVOUS])

    def get_304(connection: Connection, i: int) -> Awaitable[Response]:
        k = i % READ_RENDEZVOUS
        return connection.send(b"GET", paths[k], conditional[k])

    ok = await _hammer(connections, seconds, probe, get, 200)
    not_modified = await _hammer(connections, seconds, probe, get_304, 304)
    for path in paths:
        _expect(await setup.request(b"DELETE", path), 204, "delete")
    close_all([*connections, setup])
    return {
        "scenario": "read-heavy",
        "rendezvous": READ_RENDEZVOUS,
        "connections": READ_CONNECTIONS,
        **{"get200_" + name: value for name, value in ok.items()},
        **{"get304_" + name: value for name, value in not_modified.items()},
    }


async def floor(target: Target, seconds: float, probe: Probe | None) -> Figures:
    """
    The read-heavy load (GET over 64 connections) against any server's "/":
    meant for the bare twisted.web hello-world.
    """
    connections = await target.connect_many(READ_CONNECTIONS)

    def get(connection: Connection, i: int) -> Awaitable[Response]:
        return connection.send(b"GET", b"/")

    figures = await _hammer(connections, seconds, probe, get, 200)
    close_all(connections)
    return {"scenario": "floor", "connections": READ_CONNECTIONS, **figures}


PER_RENDEZVOUS = 8
# Writers in flight at once: enough that the server always has the next PUT
# queued (real writers are one device per rendezvous).
WRITERS = 128


async def _parked_round(target: Target, count: int, idle_seconds: float, probe: Probe) -> Figures:
    setup = await target.connect()
    made = [await _create(setup) for _ in range(-(-count // PER_RENDEZVOUS))]
    rss_before = probe.rss_bytes()
    readers = await target.connect_many(count)
    waiting: list[tuple[int, asyncio.Future[Response]]] = []
    for i, reader in enumerate(readers):
        path, etag = made[i // PER_RENDEZVOUS]
        condition = b"If-None-Match: " + etag + b"\r\n"
        waiting.append((i // PER_RENDEZVOUS, reader.send(b"GET", path, condition)))
    # Parked once the server has read every request (it parks each as it
    # reads it) and gone quiet; bounded, in case it never does.
    park_started = time.perf_counter()
    deadline = park_started + 60
    quiet = probe.cpu_seconds()
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
        now = probe.cpu_seconds()
        if connections_drained(target.port, count) and now - quiet < 0.005:
            break
        quiet = now
    else:
        raise BenchError(f"{count} long-polls were not all read within 60 s")
    if any(future.done() for _, future in waiting):
        raise BenchError("a long-poll was answered before any write")
    parked_after = time.perf_counter() - park_started
    rss_parked = probe.rss_bytes()
    idle = Window(probe)
    await asyncio.sleep(idle_seconds)
    idle_figures = idle.close()
    # Wake them all: one PUT per rendezvous, over a few writer connections.
    writers = await target.connect_many(min(WRITERS, len(made)))
    put_sent: list[float] = [0.0] * len(made)
    started = time.perf_counter()

    async def write(index: int, writer: Connection) -> None:
        for k in range(index, len(made), len(writers)):
            path, etag = made[k]
            put_sent[k] = time.perf_counter()
            headers = TEXT + b"If-Match: " + etag + b"\r\n"
            _expect(await writer.request(b"PUT", path, headers, b"wake"), 202, "wake")

    wake_window = Window(probe)
    await asyncio.gather(*(write(i, w) for i, w in enumerate(writers)))
    answers = [(k, await future) for k, future in waiting]
    wake_figures = wake_window.close()
    for _, answer in answers:
        _expect(answer, 200, "a woken long-poll")
    done = max(answer.arrived for _, answer in answers)
    latencies = [answer.arrived - put_sent[k] for k, answer in answers]
    # A new connection: Twisted may have timed the first one out while idle.
    close_all([*readers, *writers, setup])
    setup = await target.connect()
    for path, _ in made:
        _expect(await setup.request(b"DELETE", path), 204, "delete")
    setup.reset()
    return {
        "parked": count,
        "rendezvous": len(made),
        "parking_s": round(parked_after, 3),
        "rss_per_parked_bytes": round((rss_parked - rss_before) / count),
        "idle_server_cpu_share": idle_figures.get("server_cpu_share"),
        "idle_window_s": idle_figures["elapsed_s"],
        "wake_all_s": round(done - started, 3),
        "wake_ms_p50": _ms(percentile(latencies, 0.5)),
        "wake_ms_p99": _ms(percentile(latencies, 0.99)),
        "wake_server_cpu_share": wake_figures.get("server_cpu_share"),
        "wake_client_cpu_share": wake_figures["client_cpu_share"],
    }


async def parked(target: Target, seconds: float, probe: Probe | None, counts: list[int]) -> Figures:
    """
    For each count, that many long-polls parked at once (8 per rendezvous):
    memory per parked request, server CPU while they wait, and the time to
    wake them all with PUTs.  Needs the server's probe (memory and CPU are
    the point).
    """
    if probe is None:
        raise BenchError("the parked scenario reads the server's /proc: give --server-pid")
    rounds = [await _parked_round(target, n, min(seconds, 2.0), probe) for n in counts]
    return {"scenario": "parked", "rounds": rounds}


async def churn(
    target: Target,
    seconds: float,
    probe: Probe | None,
    rate: float,
    ttl_seconds: float,
    rounds: int,
) -> Figures:
    """
    C{rate} creates a second for C{seconds} on a server whose TTL is
    C{ttl_seconds}, C{rounds} times: resident memory before, at peak and
    once everything created has expired, and whether every expired id
    answers 404.
    """
    if probe is None:
        raise BenchError("the churn scenario reads the server's /proc: give --server-pid")
    connections = await target.connect_many(16)
    base = probe.rss_bytes()
    results = [
        await _churn_round(connections, probe, rate, seconds, ttl_seconds, base)
        for _ in range(rounds)
    ]
    close_all(connections)
    # The first round also warms the allocator up (arenas, dict tables,
    # the reactor's timer heap), which keeps its high-water mark: each
    # later round compared with the first one's end shows a leak alone.
    for later in results[1:]:
        ratio = later["rss_after_expiry_bytes"] / results[0]["rss_after_expiry_bytes"]
        later["after_over_first_after"] = round(ratio, 4)
    return {
        "scenario": "churn",
        "rate_per_s": rate,
        "seconds": seconds,
        "ttl_s": ttl_seconds,
        "rss_base_bytes": base,
        "rounds": results,
    }


async def _churn_round(
    connections: list[Connection],
    probe: Probe,
    rate: float,
    seconds: float,
    ttl_seconds: float,
    base: int,
) -> Figures:
    before = probe.rss_bytes()
    peak = before
    total = int(rate * seconds)
    paths: list[bytes] = []
    started = time.perf_counter()
    next_index = 0

    async def create(connection: Connection) -> None:
        nonlocal next_index
        while next_index < total:
            k = next_index
            next_index += 1
            delay = started + k / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            path, _ = await _create(connection, b"churn")
            paths.append(path)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, probe.rss_bytes())
            await asyncio.sleep(0.05)

    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*(create(c) for c in connections))
    achieved = len(paths) / (time.perf_counter() - started)
    # Everything expires ttl_seconds after its creation; a little more for
    # the expiry timers to have run.
    await asyncio.sleep(ttl_seconds + 0.5)
    sampler.cancel()
    after = probe.rss_bytes()
    not_gone = 0

    async def check(index: int, connection: Connection) -> None:
        nonlocal not_gone
        for path in paths[index :: len(connections)]:
            response = await connection.request(b"GET", path)
            not_gone += response.status != 404

    await asyncio.gather(*(check(i, c) for i, c in enumerate(connections)))
    return {
        "created": len(paths),
        "creates_per_s": round(achieved, 1),
        "rss_before_bytes": before,
        "rss_peak_bytes": peak,
        "rss_after_expiry_bytes": after,
        "after_over_base": round(after / base, 4),
        "expired_not_404": not_gone,
    }
