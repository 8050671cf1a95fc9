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
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    jsonFileLogObserver,
)

from rendezvous_twisted import access

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
        return FileLogObserver(out, _ClassicText())
    raise ValueError(f"unknown log format {log_format!r}; choose from {', '.join(FORMATS)}")


class _ClassicText:
    """
    Twisted's text lines (those of C{textFileLogObserver}, which twistd
    writes), made cheaper per line: the timestamp is formatted once per
    second, and an access event's text is rendered without
    C{string.Formatter}.  Together they were most of a request's cost.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def _time(self, when: float | None) -> str:
        # The text names whole seconds: one second's events share its stamp.
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def __call__(self, event: LogEvent) -> str | None:
        text = None
        # As formatEventAsClassicLogText does, but for the access event's
        # own shape: no system given, no failure attached.
        if "log_system" not in event and "log_failure" not in event:
            text = access.render(event)
        if text is None:
            return formatEventAsClassicLogText(event, formatTime=self._time)
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        line = f"{self._time(event.get('log_time'))} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"


def twistd_logs_to_stdout(parent: Any) -> bool:
    """
    Whether twistd, run with the options C{parent} (the plugin options'
    parent; None without one, as from a .tac), writes its text log to
    standard output, where L{observer}'s text lines can take its place: not
    for a log file (twistd rotates it), syslog or a C{--logger} of its own.
    """
    try:
        return (
            bool(parent["nodaemon"])
            and parent["logfile"] in (None, "", "-")
            and not parent.get("syslog")
            and parent.get("logger") is None
        )
    except (KeyError, TypeError):
        return False


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
