"""
C{rendezvous-cli}: try a rendezvous server from two terminals.

    rendezvous-cli create --data 'hello'      # prints the URL (and a QR code)
    rendezvous-cli receive URL                # waits for the other side's answer
    rendezvous-cli send URL --data 'answer'   # (in the other terminal)
    rendezvous-cli cancel URL

Payloads go to standard output byte for byte, everything else to standard
error, so that C{URL=$(rendezvous-cli create)} and
C{rendezvous-cli receive URL > file} do what they say.  Exit codes:
L{EXIT_OK}, L{EXIT_REFUSED} (the server said no; its error is printed),
L{EXIT_USAGE}, L{EXIT_TIMEOUT} (receive saw nothing new in time) and
L{EXIT_UNREACHABLE} (no answer from the server at all).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, NoReturn, TextIO
from urllib.parse import urlsplit

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import react

from rendezvous_twisted.client.rendezvous import (
    OCTET_STREAM,
    PreconditionFailedError,
    ReceiveTimeout,
    Rendezvous,
    RendezvousClient,
    ServerError,
)
from rendezvous_twisted.version import version_line
from rendezvous_twisted.words import quantity

#: Where C{create} goes without C{--server}: where C{twistd -n rendezvous}
#: listens by default.
DEFAULT_SERVER = "http://127.0.0.1:8080/"

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2  # argparse's own
EXIT_TIMEOUT = 3
EXIT_UNREACHABLE = 4


def _http_url(example: str) -> Callable[[str], str]:
    """
    An argument type: the text if it is an http:// or https:// URL with a
    host (and a port that is a number); else a usage error showing
    C{example}.
    """

    def check(text: str) -> str:
        try:
            parts = urlsplit(text)
            parts.port  # noqa: B018 (a port that is not a number raises ValueError)
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an http:// or https:// URL; {example}"
            )
        return text

    return check


#: Argument types: the server's URL, and a rendezvous' URL.
_server_url = _http_url(f"e.g. {DEFAULT_SERVER}")
_rendezvous_url = _http_url(f"give the URL create printed, e.g. {DEFAULT_SERVER}ID")


def _seconds(text: str) -> float:
    """
    C{text} as a positive number of seconds; else a usage error.
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds, e.g. 120")
    return seconds


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rendezvous-cli",
        description="Create, send to, receive from and cancel rendezvous on a rendezvous server.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def payload_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--data",
            help="the payload (UTF-8); without it, standard input is read "
            "(unless it is a terminal)",
        )
        command.add_argument(
            "--content-type",
            default=OCTET_STREAM,
            help=f"the payload's Content-Type (default {OCTET_STREAM})",
        )

    create = commands.add_parser("create", help="create a rendezvous and print its URL")
    create.add_argument(
        "--server",
        type=_server_url,
        default=DEFAULT_SERVER,
        help=f"the server's URL (default {DEFAULT_SERVER})",
    )
    payload_options(create)
    create.add_argument(
        "--no-qr", action="store_true", help="never print the QR code (printed to a terminal)"
    )

    send = commands.add_parser("send", help="replace the payload of a rendezvous")
    send.add_argument("url", type=_rendezvous_url)
    payload_options(send)
    send.add_argument(
        "--if-match",
        metavar="ETAG",
        help="write only if this ETag is current (default: the ETag read just before)",
    )
    send.add_argument(
        "--force", action="store_true", help="write unconditionally, without If-Match"
    )

    receive = commands.add_parser(
        "receive", help="wait for the next payload (long-poll) and print it"
    )
    receive.add_argument("url", type=_rendezvous_url)
    receive.add_argument(
        "--timeout",
        type=_seconds,
        default=120.0,
        help="give up after this many seconds (default 120; exit code 3)",
    )
    receive.add_argument(
        "--etag",
        help="wait for a payload other than this one (default: the one current now)",
    )
    receive.add_argument("--no-wait", action="store_true", help="print the current payload at once")

    cancel = commands.add_parser("cancel", help="delete a rendezvous")
    cancel.add_argument("url", type=_rendezvous_url)
    return parser


def _terminal(stdin: BinaryIO | None) -> bool:
    """
    Whether standard input is missing or a terminal: nothing to read a
    payload from.
    """
    return stdin is None or stdin.isatty()


def _payload(args: argparse.Namespace, stdin: BinaryIO | None) -> bytes:
    if args.data is not None:
        data: bytes = args.data.encode("utf-8")
        return data
    if stdin is None or stdin.isatty():
        return b""
    return stdin.read()


def qr_code(text: str) -> str | None:
    """
    C{text} as a QR code drawn with text characters, or None when the
    optional C{qrcode} package (C{pip install 'rendezvous-twisted[qr]'}) is
    not installed.
    """
    try:
        import qrcode  # type: ignore[import-untyped]
    except ImportError:
        return None
    code = qrcode.QRCode(border=2)
    code.add_data(text)
    out = io.StringIO()
    # Inverted: dark modules as spaces on a light background, which is
    # what a phone reads from a terminal with a dark background.
    code.print_ascii(out=out, invert=True)
    return out.getvalue()


class _Streams:
    def __init__(self, stdin: BinaryIO | None, stdout: BinaryIO, stderr: TextIO) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def say(self, message: str) -> None:
        self.stderr.write(f"rendezvous-cli: {message}\n")
        self.stderr.flush()


async def run(
    reactor: Any,
    argv: Sequence[str],
    streams: _Streams,
    client: RendezvousClient | None = None,
) -> int:
    """
    Run one command; return its exit code.  Usage errors exit through
    argparse (code 2).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "send" and args.data is None and _terminal(streams.stdin):
        # Nothing would be read: an empty payload typed by mistake would
        # overwrite what the other device is waiting for.
        parser.error(
            "send needs a payload: --data TEXT, or pipe it on standard input "
            "(--data '' sends an empty one)"
        )
    client = client or RendezvousClient(reactor)
    try:
        return await _command(args, client, streams, reactor.seconds())
    except Exception as e:
        for kind, message, code in _FAILURES:
            if isinstance(e, kind):
                streams.say(message.format(e))
                return code
        # Connection refused, DNS, TLS, timeouts...
        where = args.server if args.command == "create" else args.url
        hint = "; is it running? (twistd -n rendezvous starts one)"
        if not isinstance(e, ConnectionRefusedError):
            hint = ""
        why = str(e).rstrip(".")
        streams.say(f"no answer from the server at {where}: {type(e).__name__}: {why}{hint}")
        return EXIT_UNREACHABLE


#: What each failure prints, and the exit code it gives; the first match wins.
_FAILURES: tuple[tuple[type[Exception], str, int], ...] = (
    (ReceiveTimeout, "nothing new: {}", EXIT_TIMEOUT),
    (
        PreconditionFailedError,
        "someone else wrote first ({}); receive it, then send again",
        EXIT_REFUSED,
    ),
    (ServerError, "the server refused: {}", EXIT_REFUSED),
    # A URL the HTTP client cannot use.
    (ValueError, "bad URL or value: {}", EXIT_USAGE),
)


async def _command(
    args: argparse.Namespace, client: RendezvousClient, streams: _Streams, now: float
) -> int:
    if args.command == "create":
        body = _payload(args, streams.stdin)
        rendezvous = await client.create(args.server, body, args.content_type)
        streams.stdout.write(rendezvous.url.encode("ascii") + b"\n")
        streams.stdout.flush()
        if not args.no_qr and streams.stderr.isatty():
            drawing = qr_code(rendezvous.url)
            if drawing is not None:
                streams.stderr.write(drawing)
        streams.say(f"expires in {_expires_in(now, rendezvous)}")
        return EXIT_OK
    if args.command == "send":
        body = _payload(args, streams.stdin)
        target = Rendezvous(args.url, args.if_match)
        if args.if_match is None and not args.force:
            # Conditional on what is there now: a write by someone else
            # between this read and the PUT gives a 412, not a silent loss.
            target = (await client.read(args.url)).rendezvous
        sent = await client.send(target, body, args.content_type, if_match=not args.force)
        streams.say(f"sent {quantity(len(body), 'byte')} ({args.content_type}); ETag {sent.etag}")
        return EXIT_OK
    if args.command == "receive":
        if args.no_wait:
            message = await client.read(args.url)
        else:
            seen = Rendezvous(args.url, args.etag)
            if args.etag is None:
                seen = (await client.read(args.url)).rendezvous
            # Any write after that read counts as new, even one that lands
            # before the long-poll does.
            streams.say("waiting for a new payload")
            message = await client.receive(seen, timeout_seconds=args.timeout)
        streams.stdout.write(message.body)
        streams.stdout.flush()
        return EXIT_OK
    assert args.command == "cancel"
    await client.cancel(args.url)
    streams.say("cancelled")
    return EXIT_OK


def _expires_in(now: float, rendezvous: Rendezvous) -> str:
    if rendezvous.expires is None:
        return "an unknown time"
    return f"{max(0, round(rendezvous.expires - now))} s"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The console script: run the command on the reactor, exit with its code.
    """
    streams = _Streams(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        raise SystemExit(await run(reactor, arguments, streams))

    react(_main)
