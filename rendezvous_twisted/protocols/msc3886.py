"""
MSC3886, the seed protocol (SPEC.md): C{POST /} creates a rendezvous and
C{/<id>} reads (long-polling), writes and deletes it.  Klein routes over the
store contract; the answers' headers and the error mapping are
L{rendezvous_twisted.http.answers}'.
"""

from __future__ import annotations

import json
import re

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from rendezvous_twisted.core import conditions
from rendezvous_twisted.core.conditions import ANY
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.store import RendezvousStore, Version
from rendezvous_twisted.http.answers import JSON, BadRequestError, respond
from rendezvous_twisted.http.guard import Guard
from rendezvous_twisted.protocols.common import Generation, body_of, known_id

OCTET_STREAM = b"application/octet-stream"

#: What a wrong method on a path says besides its Allow: the root is often a
#: newcomer's first probe (curl http://host/), so it says what it is for.
METHOD_HINTS = {b"/": "no page here: POST / creates a rendezvous (see docs/protocol.md)"}

# The control characters (RFC 5234 CTL) but horizontal tab.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class MSC3886(Generation):
    """
    The routes of SPEC.md, added to C{app} when made.
    """

    def __init__(
        self, app: Klein, store: RendezvousStore, config: Config, clock: IReactorTime, guard: Guard
    ) -> None:
        super().__init__(store, config, clock, guard)
        app.route("/", methods=["POST"], endpoint="msc3886.create")(self.create)
        rendezvous = "/<rendezvous_id>"
        app.route(rendezvous, methods=["GET"], endpoint="msc3886.read")(self.read)
        app.route(rendezvous, methods=["PUT"], endpoint="msc3886.write")(self.write)
        app.route(rendezvous, methods=["DELETE"], endpoint="msc3886.delete")(self.delete)

    def create(self, request: IRequest) -> Deferred[bytes]:
        """
        POST /: 200 with JSON C{{"id": ..., "max_bytes": ...}} and Location.
        """
        body = body_of(request)
        content_type = self._content_type(request)
        max_bytes = self._store.max_bytes
        d = self._store.create(body, content_type, self._guard.creator(request))

        def created(version: Version) -> bytes:
            location = self.base_url(request) + version.rendezvous_id
            headers = request.responseHeaders
            headers.setRawHeaders(b"Location", [location.encode("ascii")])
            headers.setRawHeaders(b"X-Max-Bytes", [b"%d" % max_bytes])
            payload = json.dumps({"id": version.rendezvous_id, "max_bytes": max_bytes})
            return respond(request, 200, payload.encode("ascii"), JSON, version)

        return d.addCallback(created)

    def read(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        """
        GET /<id>: the payload with its stored type, long-polling on a
        matching If-None-Match.
        """
        return self.read_rendezvous(request, rendezvous_id)

    def write(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        """
        PUT /<id>: 202, on a matching If-Match (an absent one is "*").
        """
        known_id(rendezvous_id)
        body = body_of(request)
        content_type = self._content_type(request)
        if_match = conditions.parse(request.requestHeaders.getRawHeaders(b"If-Match"))
        if if_match is None:
            if_match = ANY  # SPEC.md: an absent If-Match is "*"
        d = self._store.write(rendezvous_id, body, content_type, if_match)
        return d.addCallback(lambda version: respond(request, 202, b"", JSON, version))

    def delete(self, request: IRequest, rendezvous_id: str) -> Deferred[bytes]:
        """
        DELETE /<id>: 204.
        """
        return self.delete_rendezvous(request, rendezvous_id)

    def _content_type(self, request: IRequest) -> bytes:
        values = request.requestHeaders.getRawHeaders(b"Content-Type")
        if not values or values == [b""]:
            return OCTET_STREAM
        if len(values) > 1:
            raise BadRequestError("M_INVALID_PARAM", "more than one Content-Type")
        limit = self._config.max_content_type_bytes
        if len(values[0]) > limit:
            raise BadRequestError("M_INVALID_PARAM", f"Content-Type is over {limit} bytes")
        if _CONTROL.search(values[0]) is not None:
            # Stored and sent back byte for byte to every reader, where a
            # control character is not a field value (RFC 9110 5.5) and some
            # parsers read \x0b or \x0c as a line break.  obs-text (bytes
            # 0x80-0xff) is a field value, and is kept as it came.
            raise BadRequestError("M_INVALID_PARAM", "Content-Type holds a control character")
        content_type: bytes = values[0]
        return content_type
