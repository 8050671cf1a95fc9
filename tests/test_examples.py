"""
The examples under examples/ run to completion by themselves, as the docs
say to run them, against a real C{twistd rendezvous}.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_end_to_end import CLEAN_EXIT, start_plugin_server

REPO = Path(__file__).resolve().parent.parent


def test_python_client_example_completes_an_exchange_alone(tmp_path: Path) -> None:
    """examples/python_client.py runs both devices' whole exchange and exits 0."""
    server = start_plugin_server(tmp_path)
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "python_client.py"),
                f"http://127.0.0.1:{server.port}/",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        code = server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"A created http://127.0.0.1:{server.port}/")
    assert lines[1:] == [
        "B read: hello from A",
        "B answered",
        "A received: hello from B",
        "A cancelled the rendezvous",
    ]
    assert code in CLEAN_EXIT, server.text()
    server.assert_no_trouble()
    # Every request the exchange made was answered as expected.
    assert " 404 " not in server.text() and " 412 " not in server.text()


def test_python_client_example_without_a_server_says_so_in_one_line(tmp_path: Path) -> None:
    """Without a server, the example ends with one line naming the problem, not a traceback."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_client.py"), "http://127.0.0.1:1/"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("python_client: ConnectionRefusedError: "), line


@pytest.mark.parametrize(
    ("arguments", "code", "said"),
    [
        (["127.0.0.1:8080"], 2, "argument server: '127.0.0.1:8080' is not an http:// or https://"),
        (["http://127.0.0.1:1/", "again"], 2, "unrecognized arguments: again"),
        (["--help"], 0, "usage: python examples/python_client.py [-h] [server]"),
    ],
)
def test_python_client_example_usage_mistakes_are_short(
    arguments: list[str], code: int, said: str
) -> None:
    """A URL without http://, a second argument or --help print the usage, not a traceback."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_client.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output
    assert said in output, output
    assert len(output.splitlines()) <= 10, output
