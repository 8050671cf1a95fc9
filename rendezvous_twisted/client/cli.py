"""
C{rendezvous-cli}: try a rendezvous server from two terminals.

    rendezvous-cli create --data 'hello'      # prints the URL (and a QR code)
    rendezvous-cli receive URL                # waits for the other side's answer
    rendezvous-cli send URL --data 'answer'   # (in the other terminal)
    rendezvous-cli cancel URL

With C{--protocol msc4388} the same commands speak MSC4388's sessions, named
by an id on a server (C{--server}, its base URL) instead of a URL:

    rendezvous-cli create --protocol msc4388 --data 'hello' --wait   # prints the id
    rendezvous-cli receive --protocol msc4388 --no-wait ID            # (the other terminal)
    rendezvous-cli send --protocol msc4388 ID --data 'answer'

Payloads go to standard output byte for byte, everything else to standard
error, so that C{URL=$(rendezvous-cli create)} and
C{rendezvous-cli receive URL > file} do what they say.  Exit codes:
L{EXIT_OK}, L{EXIT_REFUSED} (the server said no; its error is printed),
L{EXIT_USAGE}, L{EXIT_TIMEOUT} (receive saw nothing new in time) and
L{EXIT_UNREACHABLE} (no answer from the server at all).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import react

from rendezvous_twisted.client.commands import (
    MSC4388,
    NATIVE,
    Native,
    Sessions,
    Side,
    Streams,
    perform,
    refuse,
    terminal,
)
from rendezvous_twisted.client.msc4388 import PREFIXES, MSC4388Client
from rendezvous_twisted.client.rendezvous import (
    OCTET_STREAM,
    ConcurrentWriteError,
    ForbiddenError,
    HTTPRequester,
    PreconditionFailedError,
    ReceiveTimeout,
    RendezvousClient,
    ServerError,
    UnauthorizedError,
    UnrecognizedError,
)
from rendezvous_twisted.version import version_line

#: Where C{create} goes without C{--server}: where C{twistd -n rendezvous}
#: listens by default.
DEFAULT_SERVER = "http://127.0.0.1:8080/"
#: Where an MSC4388 access token is read from when C{--access-token} is not
#: given (an argument is visible to every user of the machine in C{ps}).
ACCESS_TOKEN_VARIABLE = "RENDEZVOUS_ACCESS_TOKEN"  # noqa: S105 (a name, not a secret)

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
#: MSC4388's ids follow the Matrix opaque identifier grammar.
_SESSION_ID = re.compile(r"[0-9A-Za-z._~-]{1,255}")


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


class _Parser(argparse.ArgumentParser):
    """
    An argument parser whose usage errors are one line (the usage text,
    grown with two protocols' options, would bury the mistake).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rendezvous-cli",
        description="Create, send to, receive from and cancel rendezvous on a rendezvous server "
        "(the native protocol, or MSC4388's sessions with --protocol msc4388).",
    )
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, protocols: tuple[str, ...] = (NATIVE, MSC4388)
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        # Kept to name the command's own usage in a mistake found later.
        sub.set_defaults(command_parser=sub)
        sub.add_argument(
            "--protocol",
            choices=protocols,
            default=protocols[0],
            help=f"the protocol to speak (default {protocols[0]})",
        )
        sub.add_argument(
            "--server",
            type=_server_url,
            help=f"the server's URL (default {DEFAULT_SERVER}); with msc4388, its base URL "
            "(native send, receive and cancel take the rendezvous' URL instead)",
        )
        sub.add_argument(
            "--prefix",
            choices=tuple(PREFIXES),
            help="msc4388: the API's path under the base URL, the unstable one (the default, "
            "what clients in the field use) or the stable one",
        )
        if name in ("create", "discover"):
            sub.add_argument(
                "--access-token",
                metavar="TOKEN",
                help="msc4388: an access token for discovery and create, where the server "
                f"lets only its users create (better: the environment's {ACCESS_TOKEN_VARIABLE},"
                " since arguments show in ps)",
            )
        return sub

    def payload_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--data",
            help="the payload (UTF-8); without it, standard input is read "
            "(unless it is a terminal)",
        )
        sub.add_argument(
            "--content-type",
            help=f"native: the payload's Content-Type (default {OCTET_STREAM})",
        )

    def target(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "target",
            metavar="URL|ID",
            help="the rendezvous' URL create printed (native), or the session's id (msc4388)",
        )

    def waiting(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--timeout",
            type=_seconds,
            default=120.0,
            help="give up waiting after this many seconds (default 120; exit code 3)",
        )

    create = command("create", "create a rendezvous and print its URL (msc4388: its id)")
    payload_options(create)
    create.add_argument(
        "--no-qr", action="store_true", help="never print the QR code (printed to a terminal)"
    )
    create.add_argument(
        "--wait",
        action="store_true",
        help="then wait for the other side's answer and print it",
    )
    waiting(create)

    send = command("send", "replace the payload of a rendezvous")
    target(send)
    payload_options(send)
    send.add_argument(
        "--if-match",
        metavar="ETAG",
        help="native: write only if this ETag is current (default: the ETag read just before)",
    )
    send.add_argument(
        "--force", action="store_true", help="native: write unconditionally, without If-Match"
    )
    send.add_argument(
        "--sequence-token",
        metavar="TOKEN",
        help="msc4388: write only if this token is current (default: the one read just before)",
    )
    send.add_argument(
        "--txn-id",
        metavar="TXN",
        help="msc4388: the transaction's id (default: a new random one); a send repeated with "
        "the same id gets the first one's answer and writes nothing",
    )

    receive = command("receive", "wait for the next payload (long-poll) and print it")
    target(receive)
    waiting(receive)
    receive.add_argument(
        "--etag",
        help="native: wait for a payload other than this one (default: the one current now)",
    )
    receive.add_argument(
        "--sequence-token",
        metavar="TOKEN",
        help="msc4388: wait for data other than this token's (default: the data current now)",
    )
    receive.add_argument("--no-wait", action="store_true", help="print the current payload at once")

    cancel = command("cancel", "delete a rendezvous")
    target(cancel)

    command(
        "discover",
        "msc4388: print whether this requester may create sessions (create_available)",
        protocols=(MSC4388,),
    )
    return parser


#: Options of one protocol only: (dest, option, protocol, what to do instead).
_OPTIONS_OF: tuple[tuple[str, str, str, str], ...] = (
    ("content_type", "--content-type", NATIVE, "MSC4388's data is a string, sent as JSON"),
    ("if_match", "--if-match", NATIVE, "msc4388 sends are conditional: --sequence-token"),
    ("force", "--force", NATIVE, "every MSC4388 send is conditional on a sequence token"),
    ("etag", "--etag", NATIVE, "msc4388 uses --sequence-token"),
    ("sequence_token", "--sequence-token", MSC4388, "native uses --etag or --if-match"),
    ("txn_id", "--txn-id", MSC4388, "native writes have no transaction id"),
    ("prefix", "--prefix", MSC4388, "the native protocol lives where --server points"),
    ("access_token", "--access-token", MSC4388, "the native protocol takes no token"),
)


def _check(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """
    Refuse, with one line naming the option, what the command line asks
    that its protocol cannot do; then fill in the defaults that depend on
    the protocol.  (argparse cannot: its types see one argument at a time.)
    """
    protocol = args.protocol
    for dest, option, owner, instead in _OPTIONS_OF:
        if owner != protocol and getattr(args, dest, None) not in (None, False):
            refuse(args, f"{option} does not go with --protocol {protocol} ({instead})")
    if protocol == NATIVE and args.command != "create" and args.server is not None:
        refuse(args, f"--server goes with create or --protocol {MSC4388} (a URL names its server)")
    target = getattr(args, "target", None)
    if protocol == NATIVE and target is not None:
        try:
            _rendezvous_url(target)
        except argparse.ArgumentTypeError as e:
            refuse(args, f"argument url: {e}")
    if protocol == MSC4388 and target is not None and not _SESSION_ID.fullmatch(target):
        refuse(
            args,
            f"argument ID: {target!r} is not an MSC4388 session id (letters, digits and -._~); "
            "give the id create printed, and its server with --server",
        )
    args.server = args.server or DEFAULT_SERVER
    args.prefix = args.prefix or "unstable"
    args.access_token = getattr(args, "access_token", None) or (
        environ.get(ACCESS_TOKEN_VARIABLE) or None
    )
    if hasattr(args, "content_type"):
        args.content_type = args.content_type or OCTET_STREAM


async def run(
    reactor: Any,
    argv: Sequence[str],
    streams: Streams,
    client: RendezvousClient | None = None,
    *,
    http: HTTPRequester | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Run one command; return its exit code.  Usage errors exit through
    argparse (code 2).

    @param client: the native protocol's client (one on C{http} when None).
    @param http: what MSC4388's client (and a native one made here) makes
        requests with (an C{HTTPClient} on the reactor when None).
    @param environ: where L{ACCESS_TOKEN_VARIABLE} is read (C{os.environ}
        when None).
    """
    args = _parser().parse_args(argv)
    _check(args, os.environ if environ is None else environ)
    if args.command == "send" and args.data is None and terminal(streams.stdin):
        # Nothing would be read: an empty payload typed by mistake would
        # overwrite what the other device is waiting for.
        refuse(
            args,
            "send needs a payload: --data TEXT, or pipe it on standard input "
            "(--data '' sends an empty one)",
        )
    side: Side[Any]
    if args.protocol == MSC4388:
        prefix = PREFIXES[args.prefix]
        sessions = MSC4388Client(
            reactor, args.server, http, prefix=prefix, access_token=args.access_token
        )
        side = Sessions(sessions, args, streams.stdin)
    else:
        side = Native(client or RendezvousClient(reactor, http), args, streams.stdin)
    try:
        await perform(args, side, streams, reactor.seconds())
        return EXIT_OK
    except Exception as e:
        for kind, message, code in _FAILURES:
            if isinstance(e, kind):
                streams.say(message.format(e) + _hint(e, args))
                return code
        # Connection refused, DNS, TLS, timeouts...
        where = args.target if args.protocol == NATIVE and args.command != "create" else args.server
        hint = "; is it running? (twistd -n rendezvous starts one)"
        if not isinstance(e, ConnectionRefusedError):
            hint = ""
        why = str(e).rstrip(".")
        streams.say(f"no answer from the server at {where}: {type(e).__name__}: {why}{hint}")
        return EXIT_UNREACHABLE


#: What each failure prints, and the exit code it gives; the first match wins.
_FAILURES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str, int], ...] = (
    (ReceiveTimeout, "nothing new: {}", EXIT_TIMEOUT),
    (
        (PreconditionFailedError, ConcurrentWriteError),
        "someone else wrote first ({}); receive it, then send again",
        EXIT_REFUSED,
    ),
    (ServerError, "the server refused: {}", EXIT_REFUSED),
    # A URL the HTTP client cannot use.
    (ValueError, "bad URL or value: {}", EXIT_USAGE),
)


def _hint(error: Exception, args: argparse.Namespace) -> str:
    """
    What to try after an MSC4388 refusal that a setting explains.
    """
    if args.protocol != MSC4388:
        return ""
    if isinstance(error, UnrecognizedError):
        other = "stable" if args.prefix == "unstable" else "unstable"
        return (
            f" (the server does not serve MSC4388 under the {args.prefix} prefix: is it on? "
            f"try --prefix {other})"
        )
    if isinstance(error, UnauthorizedError):
        return f" (the access token is not valid: give another in {ACCESS_TOKEN_VARIABLE})"
    if isinstance(error, ForbiddenError) and args.command == "create" and not args.access_token:
        return (
            " (this server may let only its users create: give an access token in "
            f"{ACCESS_TOKEN_VARIABLE})"
        )
    return ""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The console script: run the command on the reactor, exit with its code.
    """
    streams = Streams(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        raise SystemExit(await run(reactor, arguments, streams))

    react(_main)
