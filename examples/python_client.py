"""
A whole rendezvous exchange with the Python client, both devices in one
script, against a running server (by default the one `twistd -n rendezvous`
starts):

    .venv/bin/python examples/python_client.py [http://127.0.0.1:8080/]

Device A creates a rendezvous and waits (a long-poll) for an answer; device
B, given the URL (in real life, by scanning a QR code), reads A's message
and answers; A receives the answer and cancels the rendezvous.  In real
life A and B are two programs on two devices: A's receive() returns only
once B has written, and fails if nobody writes before the rendezvous
expires (60 s by default).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError
from twisted.internet.task import react

from rendezvous_twisted.client import RendezvousClient, ServerError

SERVER = "http://127.0.0.1:8080/"


async def main(reactor: Any, server: str = SERVER) -> None:
    device_a = RendezvousClient(reactor)
    device_b = RendezvousClient(reactor)

    # Device A: create, and show the URL (as a QR code, in real life).
    rendezvous = await device_a.create(server, b"hello from A", "text/plain")
    print(f"A created {rendezvous.url}")
    # A waits for the answer: a long-poll the server holds until B writes.
    answer_to_a = device_a.receive(rendezvous, timeout_seconds=30)

    # Device B: read what A left, then answer (If-Match: the ETag it read).
    message = await device_b.read(rendezvous.url)
    print(f"B read: {message.body.decode()}")
    await device_b.send(message.rendezvous, b"hello from B", "text/plain")
    print("B answered")

    # A's waiting receive returns with B's answer; either side cancels.
    answer = await answer_to_a
    print(f"A received: {answer.body.decode()}")
    await device_a.cancel(answer.rendezvous)
    print("A cancelled the rendezvous")


def run(reactor: Any, *argv: str) -> Any:
    async def guarded() -> None:
        try:
            await main(reactor, *argv)
        except (ServerError, TimeoutError, ConnectError) as e:
            # One line, not a traceback: what the server said, or that
            # nobody answered.
            raise SystemExit(f"python_client: {type(e).__name__}: {e}") from None

    return Deferred.fromCoroutine(guarded())


def server_url(text: str) -> str:
    if urlsplit(text).scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def arguments(argv: list[str]) -> str:
    """
    The server's URL from the command line; a mistake ends the program with
    its usage (exit status 2), and --help prints it.
    """
    parser = argparse.ArgumentParser(
        prog="python examples/python_client.py",
        description="A whole rendezvous exchange, both devices in one script.",
    )
    parser.add_argument(
        "server", nargs="?", default=SERVER, type=server_url, help=f"default {SERVER}"
    )
    server: str = parser.parse_args(argv).server
    return server


if __name__ == "__main__":
    react(run, [arguments(sys.argv[1:])])
