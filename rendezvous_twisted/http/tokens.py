"""
Who may create MSC4388 sessions (L{CreatePolicy}): anyone (L{OpenPolicy}),
or the holders of a valid access token of a homeserver, which judges them
(its C{/_matrix/client/v3/account/whoami}).

A token that is present is never ignored where it can be judged: MSC4388
asks that an invalid one get C{401 M_UNKNOWN_TOKEN} (L{InvalidTokenError}),
not be treated as no token.  A homeserver that cannot judge it now is a
C{503} (L{HomeserverUnavailableError}), never an open door.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from twisted.internet.defer import Deferred, succeed

from rendezvous_twisted.http.answers import HTTPError


class InvalidTokenError(HTTPError):
    """
    The access token given is not valid (unknown, expired, logged out).
    """

    code = 401
    errcode = "M_UNKNOWN_TOKEN"


class HomeserverUnavailableError(HTTPError):
    """
    The homeserver cannot judge an access token now (down, slow, or
    answering something else than a verdict).
    """

    code = 503
    errcode = "M_UNKNOWN"
    headers = ((b"Retry-After", b"5"),)

    def __init__(self) -> None:
        super().__init__("the homeserver cannot judge access tokens now; try again shortly")


class CreatePolicy(Protocol):
    """
    Whether a requester may create an MSC4388 session.
    """

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        """
        Judge the requester by its C{Authorization} header values (None when
        it sent none): True if it may create, False if policy refuses it
        (C{403 M_FORBIDDEN} on create, C{create_available: false} on
        discovery).  Fails with L{InvalidTokenError} or
        L{HomeserverUnavailableError}.
        """


class OpenPolicy:
    """
    Anyone may create, and tokens are not judged: with no homeserver to ask,
    there is nothing to judge them by.
    """

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        return succeed(True)
