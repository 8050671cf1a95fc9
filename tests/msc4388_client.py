"""
A client of MSC4388's rendezvous API written from the proposal's text alone
(matrix-org/matrix-spec-proposals, proposals/4388-secure-qr-channel.md,
"Insecure rendezvous session"), and not from this server's code: what a
device does, over a real socket, in the proposal's words.  It knows of our
long-polling only as the proposal's "future optimisation" names it (the last
C{sequence_token} as a query parameter).

Blocking (http.client), so that it reads like the proposal's examples; tests
on the reactor run it in a thread.
"""

from __future__ import annotations

import http.client
import json
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

UNSTABLE_PREFIX = "/_matrix/client/unstable/io.element.msc4388/rendezvous"
STABLE_PREFIX = "/_matrix/client/v1/rendezvous"


class MatrixError(Exception):
    """
    An error response: its status and Matrix error code.
    """

    def __init__(self, status: int, errcode: str, body: Any) -> None:
        super().__init__(f"{status} {errcode}: {body}")
        self.status = status
        self.errcode = errcode
        self.body = body


@dataclass
class Payload:
    """
    What a GET (or the create) tells: the data, its sequence token, and how
    long the session has left.
    """

    data: str
    sequence_token: str
    expires_in_ms: int


@dataclass
class Created:
    id: str
    sequence_token: str
    expires_in_ms: int


class ProposalClient:
    """
    One device's view of a rendezvous server at C{host}:C{port}.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str = UNSTABLE_PREFIX,
        access_token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.prefix = prefix
        self.access_token = access_token
        self.timeout = timeout

    def _request(
        self, method: str, path: str, body: Any = None, authenticated: bool = False
    ) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {}
            raw = None
            if body is not None:
                raw = json.dumps(body).encode("utf-8")
                headers["Content-Type"] = "application/json"
            if authenticated and self.access_token is not None:
                # "clients should make requests to the discovery and creation
                # endpoints with their access token if they have one"
                headers["Authorization"] = f"Bearer {self.access_token}"
            connection.request(method, path, body=raw, headers=headers)
            response = connection.getresponse()
            content = response.read()
            response_headers = {name.lower(): value for name, value in response.getheaders()}
        finally:
            connection.close()
        # Errors are JSON too: clients only parse JSON errors.
        assert response_headers.get("content-type") == "application/json", response_headers
        parsed = json.loads(content)
        if response.status != 200:
            raise MatrixError(response.status, parsed.get("errcode", ""), parsed)
        return response.status, response_headers, parsed

    def discover(self) -> bool:
        """
        C{GET /rendezvous}: whether this requester may create a session.
        """
        _, _, body = self._request("GET", self.prefix, authenticated=True)
        available = body["create_available"]
        assert isinstance(available, bool)
        return available

    def create(self, data: str) -> Created:
        """
        C{POST /rendezvous} with the initial payload.
        """
        _, _, body = self._request("POST", self.prefix, {"data": data}, authenticated=True)
        return Created(body["id"], body["sequence_token"], body["expires_in_ms"])

    def receive(self, rendezvous_id: str, after: str | None = None) -> Payload:
        """
        C{GET /rendezvous/{id}}; C{after}: the last sequence token seen, for
        the server to hold the request until it changes.
        """
        path = f"{self.prefix}/{quote(rendezvous_id, safe='')}"
        if after is not None:
            path += f"?sequence_token={quote(after, safe='')}"
        _, _, body = self._request("GET", path)
        return Payload(body["data"], body["sequence_token"], body["expires_in_ms"])

    def send(
        self, rendezvous_id: str, sequence_token: str, data: str, txn_id: str | None = None
    ) -> str:
        """
        C{PUT /rendezvous/{id}/{txnId}} (a new random transaction id of 128
        bits when none is given), answering the new sequence token.
        """
        if txn_id is None:
            txn_id = new_txn_id()
        path = f"{self.prefix}/{quote(rendezvous_id, safe='')}/{quote(txn_id, safe='')}"
        _, _, body = self._request("PUT", path, {"sequence_token": sequence_token, "data": data})
        token: str = body["sequence_token"]
        return token

    def send_without_txn(self, rendezvous_id: str, sequence_token: str, data: str) -> str:
        """
        C{PUT /rendezvous/{id}}: the earlier form, without a transaction id,
        that clients in the field still send.
        """
        path = f"{self.prefix}/{quote(rendezvous_id, safe='')}"
        _, _, body = self._request("PUT", path, {"sequence_token": sequence_token, "data": data})
        token: str = body["sequence_token"]
        return token

    def cancel(self, rendezvous_id: str) -> None:
        """
        C{DELETE /rendezvous/{id}}: 200 with an empty object.
        """
        _, _, body = self._request("DELETE", f"{self.prefix}/{quote(rendezvous_id, safe='')}")
        assert body == {}


def new_txn_id() -> str:
    """
    "a random value of at least 128 bits", in the opaque identifier grammar.
    """
    return secrets.token_urlsafe(16)
