"""
Start the server with `twistd -ny rendezvous.tac`.

Settings come from environment variables, one per `twistd rendezvous`
option (RENDEZVOUS_LISTEN, RENDEZVOUS_TTL, RENDEZVOUS_MAX_BYTES, ...; see
README.md). The options, their defaults and the service are exactly those of
the plugin.
"""

import os

from twisted.application.service import Application

from rendezvous_twisted.tap import makeService, options_from_environment

application = Application("rendezvous")
makeService(options_from_environment(os.environ)).setServiceParent(application)
