"""
Makes C{twistd rendezvous} available.  No package here may have an
C{__init__.py}: it would hide Twisted's own plugins.
"""

from twisted.application.service import ServiceMaker

rendezvous = ServiceMaker(
    "rendezvous-twisted",
    "rendezvous_twisted.tap",
    "A rendezvous server for the Matrix QR-code login handshake (MSC3886 and MSC4108).",
    "rendezvous",
)
