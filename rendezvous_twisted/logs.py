"""
Log output: text for a terminal, JSON lines for journald or a collector.

twistd sets up logging itself, after the plugin has built its service; a
service tree built with a log observer hands it to twistd as the
application's C{ILogObserver} component (see L{RendezvousRoot}), which
twistd uses instead of its own.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import ILogObserver, jsonFileLogObserver, textFileLogObserver

#: The values of --log-format.
FORMATS = ("text", "json")


def observer(log_format: str, stream: IO[str] | None = None) -> ILogObserver:
    """
    An observer writing every event to C{stream} (standard output when
    None): one JSON object per line for "json", Twisted's text lines for
    "text".
    """
    out = sys.stdout if stream is None else stream
    if log_format == "json":
        # One object per line, without the RFC 7464 record separator, as
        # journald and most collectors expect.
        return jsonFileLogObserver(out, recordSeparator="")
    if log_format == "text":
        return textFileLogObserver(out)
    raise ValueError(f"unknown log format {log_format!r}; choose from {', '.join(FORMATS)}")


class RendezvousRoot(MultiService):
    """
    The root of the server's services.  Given a log observer, it installs
    it as the C{ILogObserver} of the application it is added to (unless that
    application already has one, as a .tac may set), which is how twistd
    learns of it.
    """

    def __init__(self, log_observer: ILogObserver | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.log_observer = log_observer

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.log_observer is not None
            and hasattr(parent, "getComponent")
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]
