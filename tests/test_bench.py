"""
A smoke test of the benchmark: C{python -m bench --all} starts its own
servers (twistd rendezvous and the bare twisted.web floor), runs every
scenario for a fraction of a second over real loopback sockets, and prints
one JSON line per scenario.  Only the shape and correctness of the report
are checked, never a performance figure.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
#: Room for three server starts on a busy two-core machine.
DEADLINE_SECONDS = 120


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """
    The JSON lines of one short, unpinned run of every scenario, by scenario.
    """
    out = tmp_path_factory.mktemp("bench") / "run.jsonl"
    argv = [
        sys.executable, "-m", "bench", "--all", "--no-pin", "--seconds=0.1",
        "--parked=16,max", "--churn-seconds=0.2", "--churn-rate=100", "--churn-ttl=0.2",
        "--churn-rounds=2", "--redis-processes=1,2", f"--out={out}",
    ]  # fmt: skip
    # "max" parked would open thousands of sockets; cap the open-file limit
    # so that it means 16 more, and the run stays short.
    cap = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (512, 512))"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{cap}; import runpy, sys; sys.argv = {argv[2:]!r}; "
            "runpy.run_module('bench', run_name='__main__')",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    printed = [json.loads(line) for line in done.stdout.splitlines()]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written
    by_name = {line["scenario"]: line for line in printed if "variant" not in line}
    for line in printed:
        if "variant" in line:
            by_name[line["scenario"] + ":" + line["variant"]] = line
    return by_name


def _numbers(figures: dict[str, Any], *names: str) -> None:
    for name in names:
        value = figures[name]
        assert isinstance(value, (int, float)) and value >= 0, (name, value)


def test_every_scenario_reports(report: dict[str, dict[str, Any]]) -> None:
    """--all prints one line per scenario, the Redis one included, and a summary."""
    assert set(report) == {
        "floor", "read-heavy", "read-heavy:no-access-log", "exchange", "parked", "churn",
        "redis", "summary",
    }  # fmt: skip


def test_redis_setups_beside_memory(report: dict[str, dict[str, Any]]) -> None:
    """
    The redis scenario runs whole exchanges on one and on two processes sharing one
    redis-server, beside one in-memory process, each Redis figure also as a ratio to memory's.
    """
    redis = report["redis"]
    if shutil.which("redis-server") is None:
        assert "redis-server" in redis["skipped"]
        pytest.skip("no redis-server here; .ci/run installs it")
    assert "--save  --appendonly no" in redis["redis_argv"]
    setups = redis["setups"]
    assert [(s["store"], s["processes"]) for s in setups] == [
        ("memory", 1),
        ("redis", 1),
        ("redis", 2),
    ]
    memory = setups[0]
    for setup in setups:
        _numbers(
            setup,
            "flows_per_s",
            "server_cpu_us_per_request",
            "unloaded_wake_after_put_sent_ms_p50",
            "unloaded_wake_after_put_sent_ms_p99",
        )
        assert len(setup["process_cpu_shares"]) == setup["processes"]
    for setup in setups[1:]:
        _numbers(setup, "redis_cpu_share", "redis_cpu_us_per_request")
        ratio = setup["flows_per_s"] / memory["flows_per_s"]
        assert setup["flows_per_s_over_memory"] == pytest.approx(ratio, abs=0.001)
    assert [s["cross_process_wakes"] for s in setups] == [False, False, True]
    assert report["summary"]["redis_2p_flows_per_s_over_memory"]["median"] > 0


def test_read_figures_are_ratios_to_the_floor(report: dict[str, dict[str, Any]]) -> None:
    """Read-heavy reports 200 and 304 throughput, latency, CPU shares and ratios to the floor."""
    floor = report["floor"]
    _numbers(floor, "requests_per_s", "latency_ms_p50", "latency_ms_p99", "server_cpu_share")
    for read in [report["read-heavy"], report["read-heavy:no-access-log"]]:
        _read_figures(read, floor)
    assert "--no-access-log" in report["read-heavy:no-access-log"]["server"]


def _read_figures(read: dict[str, Any], floor: dict[str, Any]) -> None:
    for kind in ("get200", "get304"):
        _numbers(
            read,
            f"{kind}_requests_per_s",
            f"{kind}_latency_ms_p50",
            f"{kind}_latency_ms_p99",
            f"{kind}_server_cpu_share",
            f"{kind}_client_cpu_share",
        )
        ratio = read[f"{kind}_requests_per_s"] / floor["requests_per_s"]
        assert read[f"{kind}_over_floor"] == pytest.approx(ratio, abs=0.001)


def test_exchange_reports_flows_and_wake_latency(report: dict[str, dict[str, Any]]) -> None:
    """Exchange runs whole flows, loaded (32 in flight) and unloaded (one), with wake latency."""
    exchange = report["exchange"]
    assert exchange["flows_in_flight"] == 32 and exchange["unloaded_flows_in_flight"] == 1
    assert exchange["flows"] > 0 and exchange["unloaded_flows"] > 0
    _numbers(
        exchange,
        "flows_per_s",
        "requests_per_s",
        "wake_after_put_sent_ms_p99",
        "unloaded_wake_after_put_sent_ms_p50",
        "unloaded_wake_after_put_sent_ms_p99",
        "server_cpu_share",
    )
    # From B's 202 to A's 200 may be negative: the server answers A first.
    assert isinstance(exchange["unloaded_wake_after_202_ms_p99"], float)


def test_parked_rounds_go_to_the_open_file_limit(report: dict[str, dict[str, Any]]) -> None:
    """Parked runs each round size, 'max' from the open-file limit, and wakes every reader."""
    rounds = report["parked"]["rounds"]
    assert [r["parked"] for r in rounds] == [16, (512 - 384) // 8 * 8]
    for r in rounds:
        assert r["rendezvous"] == r["parked"] // 8
        _numbers(r, "idle_server_cpu_share", "wake_all_s", "wake_ms_p50", "wake_ms_p99")
        assert isinstance(r["rss_per_parked_bytes"], int)


def test_churn_finds_every_expired_id_gone(report: dict[str, dict[str, Any]]) -> None:
    """Churn reports memory before, at peak and after expiry, and every expired id is a 404."""
    churn = report["churn"]
    assert len(churn["rounds"]) == 2
    for r in churn["rounds"]:
        assert r["created"] == 20
        assert r["expired_not_404"] == 0
        assert r["rss_peak_bytes"] >= r["rss_before_bytes"] > 0
        _numbers(r, "rss_after_expiry_bytes", "after_over_base", "creates_per_s")


def test_summary_takes_medians(report: dict[str, dict[str, Any]]) -> None:
    """The summary line gives median, min and max of the headline figures."""
    summary = report["summary"]
    assert summary["runs"] == 1
    ratio = summary["get200_over_floor"]
    measured = report["read-heavy"]["get200_over_floor"]
    assert ratio["min"] == ratio["median"] == ratio["max"] == measured


def test_a_scenario_whose_answers_never_come_stops_by_itself() -> None:
    """
    Against a server that accepts connections but never answers, a scenario stops at its time
    bound with a clear message, instead of hanging the run.
    """
    silent = socket.socket()
    try:
        silent.bind(("127.0.0.1", 0))
        silent.listen(128)  # the kernel accepts; nobody ever reads or answers
        port = silent.getsockname()[1]
        argv = ["--scenario=floor", "--seconds=0.1", "--scenario-timeout=1"]
        done = subprocess.run(
            [sys.executable, "-m", "bench", f"--url=http://127.0.0.1:{port}", *argv],
            cwd=REPO,
            capture_output=True,
            timeout=DEADLINE_SECONDS,
            check=False,
        )
    finally:
        silent.close()
    assert done.returncode != 0
    assert b"did not finish within 1 s" in done.stderr, done.stderr
    assert done.stdout == b""


# Against a server started by hand, as the docs say.


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
        check=False,
    )


def test_a_server_with_default_limits_is_named_with_the_flags_to_start(tmp_path: Path) -> None:
    """Against default limits (429), the bench stops with one line giving the flags that fix it."""
    from .test_end_to_end import running, start_plugin_server

    for server in running(start_plugin_server(tmp_path)):
        url = f"http://127.0.0.1:{server.port}"
        done = bench("--url", url, "--scenario", "exchange", "--seconds", "0.5")
        assert done.returncode == 1
        assert "Traceback" not in done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith(f"bench: {url} refused the load (429 M_LIMIT_EXCEEDED: "), line
        flags = bench("--server-flags").stdout.strip()
        assert line.endswith(f"twistd -n rendezvous --listen {server.port} {flags}"), line


def test_the_documented_server_command_serves_the_bench(tmp_path: Path) -> None:
    """A server started with $(python -m bench --server-flags) takes the scenarios' load."""
    from .test_end_to_end import LISTEN, TwistdServer, running

    flags = bench("--server-flags")
    assert flags.returncode == 0, flags.stderr
    arguments = flags.stdout.split()
    assert "--request-burst=1000000" in arguments
    # No access log: nothing reads the server's output pipe while the bench runs.
    argv = ["rendezvous", "--listen", LISTEN, *arguments, "--no-access-log"]
    for server in running(TwistdServer(argv, tmp_path)):
        for scenario in ("exchange", "read-heavy"):
            done = bench(
                "--url", f"http://127.0.0.1:{server.port}", "--scenario", scenario,
                "--seconds", "0.3", "--server-pid", str(server.proc.pid),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            [line] = done.stdout.splitlines()
            assert json.loads(line)["scenario"] == scenario


def test_no_server_is_one_line() -> None:
    """With nothing listening at --url, the bench says so in one line, not a traceback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    done = bench("--url", f"http://127.0.0.1:{free}", "--scenario", "exchange", "--seconds", "0.2")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(f"bench: no answer from http://127.0.0.1:{free} "), line


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        (
            ["--url", "127.0.0.1:8080"],
            "argument --url: '127.0.0.1:8080': the benchmark needs http://",
        ),
        (["--url", "https://127.0.0.1:8080"], "needs http://HOST:PORT"),
        (["--url", "http://127.0.0.1"], "needs http://HOST:PORT"),
        (["--url", "http://127.0.0.1:1", "--seconds", "-1"], "argument --seconds: '-1'"),
        (["--all", "--repeat", "0"], "argument --repeat: '0' is not a positive whole number"),
    ],
)
def test_a_bad_url_or_number_is_a_usage_error(arguments: list[str], said: str) -> None:
    """A --url that is not http://HOST:PORT or a count that is not positive: usage, no traceback."""
    done = bench(*arguments, "--scenario", "exchange")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert said in done.stderr, done.stderr


@pytest.mark.parametrize("module", ["bench", "bench.profile", "bench.h2flood"])
def test_help_is_plain_text(module: str) -> None:
    """python -m bench --help (and bench.profile's and bench.h2flood's) holds no epytext markup."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for markup in ("C{", "L{", "I{", "@param", "@return"):
        assert markup not in done.stdout, done.stdout
    assert "--server-flags" in done.stdout or module != "bench"
