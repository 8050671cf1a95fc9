"""
python -m bench: load a running rendezvous server with one scenario, or
start the servers and run every scenario.

    python -m bench --url http://127.0.0.1:8080 --scenario read-heavy --seconds 8
    python -m bench --all --repeat 3
    python -m bench --all --only redis

A server's default limits are for real clients: they refuse (429) the load
that one address sends at benchmark rates. Start the server that --url loads
with the benchmark's limits (--all does so for the servers it starts):

    twistd -n rendezvous --listen 8080 $(python -m bench --server-flags)

Each scenario prints one JSON line; --all also writes them to --out and ends
with a summary line of medians over the repeats, every read figure as a ratio
to the bare twisted.web floor measured in the same run, and every figure of
the Redis store as a ratio to the in-memory store's.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench import scenarios
from bench.client import BenchError, Refused, Target, new_event_loop
from bench.servers import (
    BENCH_LIMITS,
    Probe,
    Probes,
    Server,
    raise_nofile,
    start_floor,
    start_redis,
    start_rendezvous,
)

SCENARIOS = ("exchange", "read-heavy", "parked", "churn", "floor")
#: Scenarios that start servers of their own, so only with --all.
ALL_ONLY = ("redis",)
#: File descriptors kept back from the open-file limit for everything that
#: is not a parked connection (listener, epoll, logs, up to 128 writer
#: connections, the setup connection).
FD_RESERVE = 384
SERVER_CPU = 0
CLIENT_CPU = 1


def parked_counts(spec: str, limit: int) -> list[int]:
    """
    The parked round sizes: a comma-separated list of numbers and C{max}
    (as many as the open-file limit allows, in whole rendezvous of 8).
    """
    most = (limit - FD_RESERVE) // scenarios.PER_RENDEZVOUS * scenarios.PER_RENDEZVOUS
    counts = []
    for word in spec.split(","):
        count = most if word.strip() == "max" else int(word)
        if count > most:
            raise SystemExit(f"{count} parked requests need more than the open-file limit {limit}")
        counts.append(count)
    return counts


def _positive(kind: type[float]) -> Callable[[str], float]:
    """
    An argument type: a positive number of C{kind} (a whole one for int).
    """

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not (value > 0 and value != float("inf")):
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {what}")
        return value

    return parse


def _base_url(text: str) -> str:
    """
    An argument type: an http://HOST:PORT URL (the load is plain HTTP/1.1).
    """
    try:
        parts = urlsplit(text)
        good = parts.scheme == "http" and bool(parts.hostname) and parts.port is not None
    except ValueError:  # a port that is no number, a broken [IPv6] address
        good = False
    if not good:
        raise argparse.ArgumentTypeError(
            f"{text!r}: the benchmark needs http://HOST:PORT, e.g. http://127.0.0.1:8080"
        )
    return text


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--url", type=_base_url, help="base URL of a running server, e.g. http://127.0.0.1:8080"
    )
    which.add_argument(
        "--all", action="store_true", help="start the servers and run every scenario"
    )
    which.add_argument(
        "--server-flags",
        action="store_true",
        help="print the twistd rendezvous options of a server this benchmark can load "
        "(its limits raised for one address), and exit",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        help="the scenario to run with --url (floor loads the bare twisted.web server "
        "python -m bench.floor PORT starts, not a rendezvous server)",
    )
    parser.add_argument(
        "--seconds",
        type=_positive(float),
        default=8.0,
        help="length of each load phase (default 8)",
    )
    parser.add_argument(
        "--server-pid", type=int, help="with --url: the server's pid, for its CPU and memory"
    )
    parser.add_argument(
        "--repeat", type=_positive(int), default=1, help="with --all: runs to take medians of"
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="with --all: do not pin server and client to cores"
    )
    parser.add_argument(
        "--parked",
        default="1000,10000,max",
        help="parked round sizes, comma-separated; 'max' is the open-file limit (default "
        "1000,10000,max)",
    )
    parser.add_argument(
        "--churn-rate", type=_positive(float), default=500.0, help="creates per second"
    )
    parser.add_argument(
        "--churn-seconds",
        type=_positive(float),
        default=30.0,
        help="length of a churn round (default 30)",
    )
    parser.add_argument(
        "--churn-ttl", type=_positive(float), default=5.0, help="the churn server's TTL (default 5)"
    )
    parser.add_argument(
        "--churn-rounds", type=_positive(int), default=3, help="churn rounds (default 3)"
    )
    parser.add_argument(
        "--only",
        help="with --all: a comma-separated subset of the scenarios to run ("
        + ", ".join(SCENARIOS + ALL_ONLY)
        + ")",
    )
    parser.add_argument(
        "--redis-server",
        default=shutil.which("redis-server"),
        help="the redis-server the redis scenario starts (default: the one on PATH; without "
        "one the scenario is skipped)",
    )
    parser.add_argument(
        "--redis-processes",
        default="1,2,4",
        help="with --all: server processes on one Redis, comma-separated (default 1,2,4)",
    )
    parser.add_argument(
        "--scenario-timeout",
        type=_positive(float),
        help="stop a scenario that has not finished after this many seconds (default: a "
        "generous bound from its settings); a lost answer never hangs the run",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="also write the JSON lines here (--all: default bench/last-run.jsonl)",
    )
    options = parser.parse_args(argv)
    if options.url and options.scenario is None:
        parser.error("--url needs --scenario")
    unknown = set(options.only.split(",") if options.only else ()) - {*SCENARIOS, *ALL_ONLY}
    if unknown:
        parser.error(f"--only: no scenario {', '.join(sorted(unknown))}")
    return options


class Runner:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.loop, self.loop_name = new_event_loop()
        # Every core this process may use, before --all pins it to one.
        self.cpus = os.sched_getaffinity(0)
        self.nofile = raise_nofile()
        out: Path | None = options.out
        if out is None and options.all:
            out = Path(__file__).resolve().parent / "last-run.jsonl"
        self.out = out.open("w") if out is not None else None

    def emit(self, figures: dict[str, Any]) -> None:
        line = json.dumps(figures)
        print(line, flush=True)
        if self.out is not None:
            self.out.write(line + "\n")
            self.out.flush()

    def scenario(self, name: str, url: str, probe: Probe | None) -> dict[str, Any]:
        o = self.options
        target = Target(url)
        run: Callable[[], Any]
        if name == "exchange":
            run = lambda: scenarios.exchange([target], o.seconds, probe)  # noqa: E731
        elif name == "read-heavy":
            run = lambda: scenarios.read_heavy(target, o.seconds, probe)  # noqa: E731
        elif name == "floor":
            run = lambda: scenarios.floor(target, o.seconds, probe)  # noqa: E731
        elif name == "parked":
            counts = parked_counts(o.parked, self.nofile)
            run = lambda: scenarios.parked(target, o.seconds, probe, counts)  # noqa: E731
        else:
            run = lambda: scenarios.churn(  # noqa: E731
                target, o.churn_seconds, probe, o.churn_rate, o.churn_ttl, o.churn_rounds
            )
        figures = self.bounded(name, run)
        figures.update(url=url, loop=self.loop_name, processes=1)
        return figures

    def bounded(self, name: str, run: Callable[[], Any]) -> dict[str, Any]:
        """
        Run the coroutine C{run()} makes, stopping the run at the scenario's
        time bound.
        """
        bound = self.options.scenario_timeout or self.bound(name)
        try:
            figures: dict[str, Any] = self.loop.run_until_complete(asyncio.wait_for(run(), bound))
        except TimeoutError:
            raise SystemExit(
                f"bench: the {name} scenario did not finish within {bound:g} s "
                "(an answer never came); stopped"
            ) from None
        return figures

    def bound(self, name: str) -> float:
        """
        Seconds a scenario may take before the run is stopped: its load
        phases several times over, plus room for setup on a busy machine.
        """
        o = self.options
        seconds = float(o.seconds)
        if name == "parked":
            counts = parked_counts(o.parked, self.nofile)
            # Connecting, an idle window and the wake of each round.
            return sum(60 + seconds + count / 100 for count in counts)
        if name == "churn":
            return float(o.churn_rounds * (o.churn_seconds + o.churn_ttl + 60) + 60)
        # exchange and read-heavy have two load phases, floor one; redis is
        # bounded for each of its setups, an exchange each.
        return 4 * seconds + 120

    def one(self) -> None:
        o = self.options
        probe = Probe(o.server_pid) if o.server_pid else None
        self.emit(self.scenario(o.scenario, o.url, probe))

    def all(self) -> list[dict[str, Any]]:
        o = self.options
        pin = not o.no_pin and len(os.sched_getaffinity(0)) >= 2
        server_cpu = SERVER_CPU if pin else None
        if pin:
            os.sched_setaffinity(0, {CLIENT_CPU})
        wanted = o.only.split(",") if o.only else [*SCENARIOS, *ALL_ONLY]
        figures: list[dict[str, Any]] = []
        for run in range(1, o.repeat + 1):
            servers: list[Server] = []
            try:
                floor = start_floor(server_cpu)
                servers.append(floor)
                rendezvous = start_rendezvous(server_cpu)
                servers.append(rendezvous)
                churn = start_rendezvous(server_cpu, f"--ttl={o.churn_ttl}")
                servers.append(churn)
                # The same server without its access log, to show what the
                # log's pipeline costs per request.
                quiet = start_rendezvous(server_cpu, "--no-access-log")
                servers.append(quiet)
                for server in servers:
                    server.ready()
                chosen = [
                    (name, variant, server)
                    for name, variant, server in (
                        ("floor", None, floor),
                        ("read-heavy", None, rendezvous),
                        ("read-heavy", "no-access-log", quiet),
                        ("exchange", None, rendezvous),
                        ("parked", None, rendezvous),
                        ("churn", None, churn),
                    )
                    if name in wanted
                ]
                floor_rps = floor_cpu = None
                for name, variant, server in chosen:
                    result = self.scenario(name, server.url, server.probe)
                    result.update(run=run, pinned=pin, server=" ".join(server.argv))
                    if variant is not None:
                        result["variant"] = variant
                    if name == "floor":
                        floor_rps = result["requests_per_s"]
                        floor_cpu = result.get("server_cpu_us_per_request")
                    if name == "read-heavy" and floor_rps:
                        for kind in ("get200", "get304"):
                            ratio = result[kind + "_requests_per_s"] / floor_rps
                            result[kind + "_over_floor"] = round(ratio, 3)
                            # The same ratio from CPU time per request.
                            cpu = result.get(kind + "_server_cpu_us_per_request")
                            if floor_cpu and cpu:
                                result[kind + "_cpu_over_floor"] = round(floor_cpu / cpu, 3)
                    self.emit(result)
                    figures.append(result)
            finally:
                for server in servers:
                    server.stop()
            if "redis" in wanted:
                result = self.redis()
                result.update(run=run)
                self.emit(result)
                figures.append(result)
        summary = summarize(figures)
        self.emit(summary)
        return figures

    def redis(self) -> dict[str, Any]:
        """
        The exchange against N server processes sharing one redis-server
        (each flow's requests round-robin over the processes, every wake
        crossing processes), and against one in-memory process in the same
        conditions: nothing pinned, since the point is to use every core.
        """
        o = self.options
        if not o.redis_server:
            return {
                "scenario": "redis",
                "skipped": "no redis-server found: install it (Debian: apt-get install "
                "redis-server) or give --redis-server PATH",
            }
        counts = [int(n) for n in o.redis_processes.split(",")]
        pinned_to = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.cpus)
        servers: list[Server] = []
        try:
            redis = start_redis(o.redis_server, None)
            servers.append(redis)
            redis.ready()
            store = f"--store=redis://127.0.0.1:{redis.port}/0"
            memory = start_rendezvous(None)
            servers.append(memory)
            shared = [start_rendezvous(None, store) for _ in range(max(counts))]
            servers.extend(shared)
            for server in [memory, *shared]:
                server.ready()
            for server in [memory, *shared]:
                serving = scenarios.until_serving(Target(server.url), 30)
                self.loop.run_until_complete(serving)
            setups: list[dict[str, Any]] = []
            for processes in [0, *counts]:
                group = shared[:processes] if processes else [memory]
                probes = [s.probe for s in group] + ([redis.probe] if processes else [])
                run = functools.partial(
                    scenarios.exchange, [Target(s.url) for s in group], o.seconds, Probes(probes)
                )
                figures = self.bounded("redis", run)
                setups.append(setup_figures(figures, "redis" if processes else "memory"))
        finally:
            for server in servers:
                server.stop()
            os.sched_setaffinity(0, pinned_to)
        for setup in setups[1:]:
            compare(setup, setups[0])
        version = subprocess.run(  # noqa: S603 - the redis-server we started
            [o.redis_server, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        return {
            "scenario": "redis",
            "redis_server": version,
            "redis_argv": " ".join(redis.argv),
            "hiredis": importlib.util.find_spec("hiredis") is not None,
            "server": " ".join(shared[0].argv),
            "pinned": False,
            "loop": self.loop_name,
            "setups": setups,
        }


#: The figures of an exchange kept for each setup of the redis scenario.
SETUP_FIGURES = (
    "flows_per_s", "requests_per_s", "server_cpu_us_per_request", "server_cpu_share",
    "client_cpu_share", "wake_after_put_sent_ms_p50", "wake_after_put_sent_ms_p99",
    "unloaded_wake_after_put_sent_ms_p50", "unloaded_wake_after_put_sent_ms_p99",
    "unloaded_requests_per_s",
)  # fmt: skip


def setup_figures(exchange: dict[str, Any], store: str) -> dict[str, Any]:
    """
    One setup's line in the redis scenario: the exchange's headline figures,
    the CPU share of each server process, and Redis' own (its CPU time
    counts in C{server_cpu_us_per_request}).
    """
    shares: list[float] = exchange["server_cpu_shares"]
    processes = len(shares) - (store == "redis")
    figures: dict[str, Any] = {"store": store, "processes": processes}
    figures.update({key: exchange.get(key) for key in SETUP_FIGURES})
    figures["process_cpu_shares"] = shares[:processes]
    if store == "redis":
        figures["redis_cpu_share"] = shares[-1]
        requests = exchange["flows"] * scenarios.REQUESTS_PER_FLOW
        if requests:
            cpu = shares[-1] * exchange["elapsed_s"] / requests * 1e6
            figures["redis_cpu_us_per_request"] = round(cpu, 1)
    figures["cross_process_wakes"] = processes > 1
    return figures


#: Figures of a Redis setup quoted as a ratio to the in-memory one's.
COMPARED = (
    "flows_per_s", "server_cpu_us_per_request",
    "unloaded_wake_after_put_sent_ms_p50", "unloaded_wake_after_put_sent_ms_p99",
)  # fmt: skip


def compare(setup: dict[str, Any], memory: dict[str, Any]) -> None:
    """
    Add C{NAME_over_memory} to C{setup} for each figure of L{COMPARED}.
    """
    for key in COMPARED:
        mine, theirs = setup.get(key), memory.get(key)
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
            setup[key + "_over_memory"] = round(mine / theirs, 3)


def summarize(figures: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The median of each headline figure over the runs, with its range.
    """
    picks: dict[str, list[float]] = {}

    def add(name: str, value: Any) -> None:
        if isinstance(value, (int, float)):
            picks.setdefault(name, []).append(value)

    for f in figures:
        s = f["scenario"]
        if s == "floor":
            add("floor_requests_per_s", f["requests_per_s"])
            add("floor_server_cpu_share", f.get("server_cpu_share"))
            add("floor_server_cpu_us_per_request", f.get("server_cpu_us_per_request"))
        elif s == "read-heavy":
            prefix = f.get("variant", "")
            prefix = prefix and prefix + "_"
            for key in (
                "get200_requests_per_s", "get200_over_floor", "get200_latency_ms_p99",
                "get304_requests_per_s", "get304_over_floor", "get304_latency_ms_p99",
                "get200_server_cpu_share", "get200_client_cpu_share",
                "get200_cpu_over_floor", "get304_cpu_over_floor",
                "get200_server_cpu_us_per_request", "get304_server_cpu_us_per_request",
            ):  # fmt: skip
                add(prefix + key, f.get(key))
        elif s == "exchange":
            for key in (
                "flows_per_s", "requests_per_s", "wake_after_put_sent_ms_p99",
                "unloaded_wake_after_put_sent_ms_p50", "unloaded_wake_after_put_sent_ms_p99",
                "unloaded_wake_after_202_ms_p99", "server_cpu_share", "server_cpu_us_per_request",
            ):  # fmt: skip
                add("exchange_" + key, f.get(key))
        elif s == "parked":
            for r in f["rounds"]:
                n = r["parked"]
                for key in (
                    "rss_per_parked_bytes",
                    "idle_server_cpu_share",
                    "wake_all_s",
                    "wake_ms_p99",
                ):
                    add(f"parked_{n}_{key}", r.get(key))
        elif s == "redis" and "setups" in f:
            for setup in f["setups"]:
                name = f"{setup['store']}_{setup['processes']}p_"
                for key in (*COMPARED, *(k + "_over_memory" for k in COMPARED)):
                    add(name + key, setup.get(key))
        elif s == "churn":
            add("churn_worst_after_over_base", max(r["after_over_base"] for r in f["rounds"]))
            add("churn_expired_not_404", sum(r["expired_not_404"] for r in f["rounds"]))
            later = [r["after_over_first_after"] for r in f["rounds"][1:]]
            if later:
                add("churn_worst_after_over_first_after", max(later))
    summary: dict[str, Any] = {"scenario": "summary", "runs": len({f.get("run") for f in figures})}
    for name, values in picks.items():
        summary[name] = {
            "median": round(statistics.median(values), 4),
            "min": min(values),
            "max": max(values),
        }
    return summary


def server_command(url: str | None) -> str:
    """
    The command that starts a server this benchmark can load at C{url}.
    """
    port = urlsplit(url).port if url else None
    return f"twistd -n rendezvous --listen {port or 8080} {' '.join(BENCH_LIMITS)}"


def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    if options.server_flags:
        print(" ".join(BENCH_LIMITS))
        return 0
    # A SIGTERM unwinds like ^C, so that the servers this run started stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runner = Runner(options)
    try:
        if options.all:
            runner.all()
        else:
            runner.one()
    # One line, never a traceback, for what a user can fix.
    except Refused as e:
        raise SystemExit(
            f"bench: {options.url or 'the server'} refused the load ({e}): its limits are "
            "for real clients, not one address at benchmark rates; start it with the "
            f"benchmark's: {server_command(options.url)}"
        ) from None
    except (ConnectionError, TimeoutError) as e:
        raise SystemExit(
            f"bench: no answer from {options.url} ({e.strerror or e}); start the server "
            f"first: {server_command(options.url)}"
        ) from None
    except BenchError as e:
        raise SystemExit(f"bench: {e}") from None
    finally:
        runner.loop.close()
        if runner.out is not None:
            runner.out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
