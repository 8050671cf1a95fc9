"""
What each C{rendezvous-cli} command does (L{perform}), written once for both
protocols: an adapter per protocol (L{Native}, L{Sessions} for MSC4388)
gives the steps, and L{Streams} where their output goes.  The command line
itself is L{rendezvous_twisted.client.cli}'s.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
from typing import Any, BinaryIO, Generic, NoReturn, Protocol, TextIO, TypeVar

from rendezvous_twisted.client.msc4388 import MSC4388Client, Session
from rendezvous_twisted.client.rendezvous import Rendezvous, RendezvousClient
from rendezvous_twisted.words import quantity

NATIVE, MSC4388 = "native", "msc4388"
_S = TypeVar("_S")
_C = TypeVar("_C")


def refuse(args: argparse.Namespace, message: str) -> NoReturn:
    """
    Exit with a usage error of the command C{args} are for (code 2).
    """
    parser: argparse.ArgumentParser = args.command_parser
    parser.error(message)


def terminal(stdin: BinaryIO | None) -> bool:
    """
    Whether standard input is missing or a terminal: nothing to read a
    payload from.
    """
    return stdin is None or stdin.isatty()


def payload_of(args: argparse.Namespace, stdin: BinaryIO | None) -> bytes:
    if args.data is not None:
        data: bytes = args.data.encode("utf-8")
        return data
    if stdin is None or stdin.isatty():
        return b""
    return stdin.read()


def text_of(args: argparse.Namespace, stdin: BinaryIO | None) -> str:
    """
    The payload as MSC4388's data: text.
    """
    payload = payload_of(args, stdin)
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        refuse(args, f"--protocol {MSC4388} sends text: the payload on standard input is not UTF-8")


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


class Streams:
    """
    Where a command reads its payload, writes payloads (standard output,
    byte for byte) and says everything else (standard error).
    """

    def __init__(self, stdin: BinaryIO | None, stdout: BinaryIO, stderr: TextIO) -> None:
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def say(self, message: str) -> None:
        self.stderr.write(f"rendezvous-cli: {message}\n")
        self.stderr.flush()

    def out(self, data: bytes) -> None:
        self.stdout.write(data)
        self.stdout.flush()


class Side(Protocol[_S]):
    """
    What the commands need of a protocol; C{_S} is how it names what was
    seen of a rendezvous (a L{Rendezvous}, a L{Session}).
    """

    async def create(self, streams: Streams, now: float) -> _S:
        """
        Create a rendezvous holding the payload; print how to reach it.
        """

    def named(self) -> _S | None:
        """
        What the command line says was seen (an ETag, a sequence token), if
        it says.
        """

    async def read(self) -> tuple[bytes, _S]:
        """
        The current payload, and what this read saw.
        """

    async def receive(self, seen: _S, timeout_seconds: float) -> bytes:
        """
        The next payload after C{seen}.
        """

    async def send(self, seen: _S) -> str:
        """
        Send the payload if C{seen} is current; say what was sent.
        """

    async def cancel(self) -> None:
        """
        Delete the rendezvous.
        """


class _Adapter(Generic[_C]):
    """
    A protocol's client, and the command line it runs.
    """

    def __init__(self, client: _C, args: argparse.Namespace, stdin: BinaryIO | None) -> None:
        self.client = client
        self.args = args
        self.stdin = stdin


class Native(_Adapter[RendezvousClient]):
    """
    The native protocol: a rendezvous is its URL.
    """

    async def create(self, streams: Streams, now: float) -> Rendezvous:
        args = self.args
        body = payload_of(args, self.stdin)
        rendezvous = await self.client.create(args.server, body, args.content_type)
        streams.out(rendezvous.url.encode("ascii") + b"\n")
        if not args.no_qr and streams.stderr.isatty():
            drawing = qr_code(rendezvous.url)
            if drawing is not None:
                streams.stderr.write(drawing)
        streams.say(f"expires in {expires_in(now, rendezvous.expires)}")
        return rendezvous

    def named(self) -> Rendezvous | None:
        args = self.args
        if args.command == "send":
            # --force: no ETag, and no read for one.
            named = args.if_match is not None or args.force
            return Rendezvous(args.target, args.if_match) if named else None
        return None if args.etag is None else Rendezvous(args.target, args.etag)

    async def read(self) -> tuple[bytes, Rendezvous]:
        message = await self.client.read(self.args.target)
        return message.body, message.rendezvous

    async def receive(self, seen: Rendezvous, timeout_seconds: float) -> bytes:
        return (await self.client.receive(seen, timeout_seconds)).body

    async def send(self, seen: Rendezvous) -> str:
        args = self.args
        body = payload_of(args, self.stdin)
        sent = await self.client.send(seen, body, args.content_type, if_match=not args.force)
        return f"sent {quantity(len(body), 'byte')} ({args.content_type}); ETag {sent.etag}"

    async def cancel(self) -> None:
        await self.client.cancel(self.args.target)


class Sessions(_Adapter[MSC4388Client]):
    """
    MSC4388's sessions: a session is its id on the server (C{--server}).
    """

    async def create(self, streams: Streams, now: float) -> Session:
        args = self.args
        session = await self.client.create(text_of(args, self.stdin))
        streams.out(session.id.encode("ascii") + b"\n")
        # MSC4388's QR code also holds a key of its secure channel, which
        # this tool does not run: the id and the base URL are given as text.
        streams.say(f"session {session.id} on {args.server} ({args.prefix} prefix)")
        streams.say(f"the other device: {other_device(args, session.id)}")
        expires = expires_in(now, session.expires)
        streams.say(f"sequence token {session.sequence_token}; expires in {expires}")
        return session

    def named(self) -> Session | None:
        token = self.args.sequence_token
        return None if token is None else Session(self.args.target, token)

    async def read(self) -> tuple[bytes, Session]:
        payload = await self.client.read(self.args.target)
        return payload.data.encode("utf-8"), payload.session

    async def receive(self, seen: Session, timeout_seconds: float) -> bytes:
        return (await self.client.receive(seen, timeout_seconds)).data.encode("utf-8")

    async def send(self, seen: Session) -> str:
        data = text_of(self.args, self.stdin)
        sent = await self.client.send(seen, data, txn_id=self.args.txn_id)
        size = quantity(len(data.encode("utf-8")), "byte")
        return f"sent {size}; sequence token {sent.sequence_token}"

    async def cancel(self) -> None:
        await self.client.delete(self.args.target)

    async def discover(self) -> bytes:
        available = await self.client.discover()
        return f"create_available: {json.dumps(available)}\n".encode("ascii")


async def perform(args: argparse.Namespace, side: Side[Any], streams: Streams, now: float) -> None:
    """
    Run the command through the protocol's C{side}.
    """
    if args.command == "discover":
        assert isinstance(side, Sessions)
        streams.out(await side.discover())
    elif args.command == "create":
        created = await side.create(streams, now)
        if args.wait:
            streams.say("waiting for the other side's answer")
            streams.out(await side.receive(created, args.timeout))
    elif args.command == "send":
        # By default conditional on what is there now: a write by someone
        # else between this read and the send is refused, not lost.
        seen = side.named() or (await side.read())[1]
        streams.say(await side.send(seen))
    elif args.command == "receive":
        if args.no_wait:
            payload, _ = await side.read()
        else:
            # Any write after that read counts as new, even one that lands
            # before the long-poll does.
            seen = side.named() or (await side.read())[1]
            streams.say("waiting for a new payload")
            payload = await side.receive(seen, args.timeout)
        streams.out(payload)
    else:
        assert args.command == "cancel"
        await side.cancel()
        streams.say("cancelled")


def other_device(args: argparse.Namespace, session_id: str) -> str:
    """
    The command that reads this session from another terminal.
    """
    words = ["rendezvous-cli", "receive", "--protocol", MSC4388, "--server", args.server]
    if args.prefix != "unstable":
        words += ["--prefix", args.prefix]
    return shlex.join([*words, "--no-wait", session_id])


def expires_in(now: float, expires: float | None) -> str:
    if expires is None:
        return "an unknown time"
    return f"{max(0, round(expires - now))} s"
