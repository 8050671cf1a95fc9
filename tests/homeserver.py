"""
A stand-in for a Matrix homeserver's C{GET /_matrix/client/v3/account/whoami},
on a real loopback socket, for tests of MSC4388's authenticated create policy
against servers in their own processes: a threaded http.server in the test
process, answering per access token as a homeserver does (the Client-Server
API's whoami and its 401), and counting the questions it was asked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WHOAMI = "/_matrix/client/v3/account/whoami"

#: Tokens the stand-in knows: a user's, and a guest's.
USER_TOKEN = "syt_dXNlcg_valid_token_0001"
GUEST_TOKEN = "syt_Z3Vlc3Q_guest_token_0002"
USER_ID = "@alice:example.org"


@dataclass
class Homeserver:
    """
    The stand-in's address and what it was asked.
    """

    port: int
    asked: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def homeserver() -> Iterator[Homeserver]:
    """
    Serve whoami on a free loopback port for the duration of the block.
    """
    state: Homeserver

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            authorization = self.headers.get("Authorization", "")
            token = authorization.removeprefix("Bearer ")
            state.asked.append(token)
            if self.path != WHOAMI:
                self.answer(404, {"errcode": "M_UNRECOGNIZED", "error": "no"})
            elif token == USER_TOKEN:
                self.answer(200, {"user_id": USER_ID, "device_id": "DEVICE", "is_guest": False})
            elif token == GUEST_TOKEN:
                self.answer(200, {"user_id": "@123:example.org", "is_guest": True})
            else:
                self.answer(
                    401,
                    {
                        "errcode": "M_UNKNOWN_TOKEN",
                        "error": "Unrecognised access token",
                        "soft_logout": False,
                    },
                )

        def answer(self, status: int, body: object) -> None:
            raw = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: object) -> None:
            pass  # quiet: pytest shows what the tests assert

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Homeserver(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
