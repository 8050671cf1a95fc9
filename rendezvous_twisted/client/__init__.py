"""
Twisted clients for the rendezvous protocols, on treq: the native one
(L{RendezvousClient}) and MSC4388's sessions (L{MSC4388Client}); and
C{rendezvous-cli} (L{rendezvous_twisted.client.cli}), which speaks either.
They speak HTTP to any rendezvous server and import nothing of the
server's.  The names below are the client's public API; import them from
here.
"""

from rendezvous_twisted.client.msc4388 import (
    STABLE_PREFIX,
    UNSTABLE_PREFIX,
    MSC4388Client,
    Payload,
    Session,
)
from rendezvous_twisted.client.rendezvous import (
    ConcurrentWriteError,
    ForbiddenError,
    GoneWhileWaitingError,
    Message,
    NotFoundError,
    PreconditionFailedError,
    ReceiveTimeout,
    Rendezvous,
    RendezvousClient,
    ServerError,
    UnauthorizedError,
    UnrecognizedError,
)

__all__ = [
    "STABLE_PREFIX",
    "UNSTABLE_PREFIX",
    "ConcurrentWriteError",
    "ForbiddenError",
    "GoneWhileWaitingError",
    "MSC4388Client",
    "Message",
    "NotFoundError",
    "Payload",
    "PreconditionFailedError",
    "ReceiveTimeout",
    "Rendezvous",
    "RendezvousClient",
    "ServerError",
    "Session",
    "UnauthorizedError",
    "UnrecognizedError",
]
