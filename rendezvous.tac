"""
Start the server with `twistd -ny rendezvous.tac`.

Settings come from environment variables, one per `twistd rendezvous`
option (RENDEZVOUS_LISTEN, RENDEZVOUS_TTL, RENDEZVOUS_MAX_BYTES, ...; see
the configuration docs). The options, their defaults and the service are
exactly those of the plugin. A RENDEZVOUS_* variable that is no option's is
refused, as is any bad value, with one line naming the variable.
"""

import os

from twisted.application.service import Application

from rendezvous_twisted.tap import environment_service

application = Application("rendezvous")
environment_service(os.environ).setServiceParent(application)
