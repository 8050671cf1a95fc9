"""
The floor: the cheapest thing twisted.web serves, a hello-world resource on
the default reactor, with an access log formatted and written to /dev/null
as the rendezvous server's is.  Every read figure is quoted as a ratio to
this server's, measured in the same run.

C{python -m bench.floor [PORT]} listens on 127.0.0.1 (port 0 by default).
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"Hello, world!"


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    site = Site(Hello(), logPath="/dev/null")  # type: ignore[no-untyped-call]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[arg-type]
    reactor.run()


if __name__ == "__main__":
    main()
