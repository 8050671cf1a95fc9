"""
A Twisted client for the rendezvous protocol (L{RendezvousClient}, on
treq), and C{rendezvous-cli} (L{rendezvous_twisted.client.cli}).  It speaks
HTTP to any rendezvous server and imports nothing of the server's.  The
names below are the client's public API; import them from here.
"""

from rendezvous_twisted.client.rendezvous import (
    GoneWhileWaitingError,
    Message,
    NotFoundError,
    PreconditionFailedError,
    ReceiveTimeout,
    Rendezvous,
    RendezvousClient,
    ServerError,
)

__all__ = [
    "GoneWhileWaitingError",
    "Message",
    "NotFoundError",
    "PreconditionFailedError",
    "ReceiveTimeout",
    "Rendezvous",
    "RendezvousClient",
    "ServerError",
]
