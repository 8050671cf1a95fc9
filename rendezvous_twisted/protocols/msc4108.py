"""
MSC4108's rendezvous sessions ("insecure rendezvous session", the protocol of
today's Element Web and Element X, and of Synapse), served from the same store
as the native protocol.

This module holds what MSC4108 asks that the native protocol does not: its
paths, its body type, its strict C{If-Match}, the unstable error code of its
C{412}.  C{web.py} routes the requests and answers them with its one header
helper and its one error map; nothing here knows of Klein.

A session is an ordinary rendezvous of the store: its id is also valid under
the native URL (both are bearer secrets of the same strength), it counts
against the same caps, and it expires after the same fixed TTL.
"""

from __future__ import annotations

from collections.abc import Mapping

from rendezvous_twisted.core.conditions import Condition
from rendezvous_twisted.core.store import PreconditionFailed

#: Create, as Synapse and today's clients call it.
UNSTABLE_CREATE_PATH = "/_matrix/client/unstable/org.matrix.msc4108/rendezvous"
#: Create, as the proposal names it for the stable API.
STABLE_CREATE_PATH = "/_matrix/client/v1/rendezvous"
CREATE_PATHS = frozenset((UNSTABLE_CREATE_PATH, STABLE_CREATE_PATH))

#: The one body type: stored, and answered on every 200, exactly so
#: (clients compare it with ==).
TEXT_PLAIN = b"text/plain"
#: The 412 body's extra field: the proposal's error code, unstable-prefixed
#: beside the stable C{M_UNKNOWN}, as Synapse answers it.
CONCURRENT_WRITE_FIELDS: Mapping[str, str] = {"org.matrix.msc4108.errcode": "M_CONCURRENT_WRITE"}


class ConcurrentWrite(PreconditionFailed):
    """
    A stale C{If-Match} on a session: a 412 in MSC4108's words.
    """

    def __init__(self, failure: PreconditionFailed) -> None:
        super().__init__(failure.current)


def session_id(path: str, prefix: str) -> str | None:
    """
    The id in a session path (C{prefix} followed by one segment), or None
    when C{path} is not a session path.
    """
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :]
    if not rest or "/" in rest:
        return None
    return rest


def is_text_plain(value: bytes) -> bool:
    """
    Whether a C{Content-Type} is C{text/plain}: the media type compared
    without case (RFC 9110 8.3.1), parameters such as a charset allowed, as a
    browser's fetch() adds one to a string body when the page sets no type.
    """
    return value.split(b";", 1)[0].strip(b" \t").lower() == TEXT_PLAIN


def is_single_strong(condition: Condition) -> bool:
    """
    Whether an C{If-Match} names exactly one strong ETag: MSC4108 accepts
    nothing else (no C{*}, no list, no weak tag).
    """
    return not condition.any and len(condition.strong) == 1 and not condition.weak
