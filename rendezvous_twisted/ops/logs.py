"""
Log output: text for a terminal, JSON lines for journald or a collector.

A JSON line is one flat object: C{time} (ISO 8601, UTC), C{level},
C{logger} (the event's namespace), the rendered C{message}, and the
event's own fields (an access event's C{client}, C{method}, C{status}...),
each JSON-safe; a failure becomes C{exception}, its traceback as text.

twistd sets up logging itself, after the plugin has built its service; a
service tree built with a log observer hands it to twistd as the
application's C{ILogObserver} component (see L{RendezvousRoot}), which
twistd uses instead of its own.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.application.service import MultiService
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)

from rendezvous_twisted.http import access
from rendezvous_twisted.ops.service import StartFailed, StartupError
from rendezvous_twisted.version import version_line

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
        return FileLogObserver(out, json_line)
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


#: The keys of a JSON line; an event field of the same name is written as
#: C{event_NAME}.
JSON_KEYS = ("time", "level", "logger", "message", "system", "exception")
#: How deep nested values are followed before being written as text.
_DEPTH = 4


def json_line(event: LogEvent) -> str:
    """
    One event as one line of JSON (see the module's docstring), ending in
    a newline.
    """
    when = event.get("log_time")
    level = event.get("log_level")
    text = access.render(event) if "log_failure" not in event else None
    if text is None:
        text = formatEvent(event)
    record: dict[str, Any] = {
        "time": _iso_time(when),
        "level": level.name if level is not None else None,
        "logger": event.get("log_namespace"),
        "message": text,
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = str(system)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["exception"] = failure.getTraceback()
        except Exception:  # a failure that cannot say itself must not lose the line
            record["exception"] = repr(failure)
        if not text:
            record["message"] = failure.getErrorMessage()
    for key, value in event.items():
        if key.startswith("log_") or _legacy(key, value, event):
            continue
        record["event_" + key if key in JSON_KEYS else key] = _json_safe(value, _DEPTH)
    return json.dumps(record) + "\n"


def _legacy(key: str, value: Any, event: LogEvent) -> bool:
    """
    Whether C{key} is one of the keys twisted.python.log's events carry, or
    that Twisted adds to any event for a legacy observer, saying again what
    the line's own keys say.
    """
    if key == "message":
        return isinstance(value, tuple)
    if key == "time":
        return bool(value == event.get("log_time"))
    if key == "system":
        return bool(value in ("-", event.get("log_system")))
    if key == "format":
        return "log_legacy" in event or event.get("log_namespace") == "log_legacy"
    if key in ("failure", "why"):
        return "log_failure" in event
    return key == "isError"


def _iso_time(when: float | None) -> str | None:
    if when is None:
        return None
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _json_safe(value: Any, depth: int) -> Any:
    """
    C{value} as JSON can hold it: numbers, text, booleans and None as they
    are (a float that is not finite as text), lists and dicts of those,
    anything else as its C{str()} (bytes as their C{repr()}).
    """
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return repr(value)
    if depth > 0 and isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item, depth - 1) for item in value]
    if depth > 0 and isinstance(value, dict):
        return {str(k): _json_safe(v, depth - 1) for k, v in value.items()}
    try:
        return str(value)
    except Exception:
        return object.__repr__(value)


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

    Given a C{program} (the server runs as one: under twistd), a start that
    fails for a reason the operator can fix (L{StartupError}: a port in
    use...) logs that reason as one critical line and ends the process
    (L{StartFailed}); without one, it raises the L{StartupError}.
    """

    log = Logger()

    def __init__(
        self, log_observer: ILogObserver | None = None, program: str | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.log_observer = log_observer
        self.program = program
        self._announced = False

    def _announce(self) -> None:
        # Once, whichever start comes first (twistd calls both).
        if not self._announced:
            self._announced = True
            self.log.info("{version} starting", version=version_line())

    def setServiceParent(self, parent: Any) -> None:
        if (
            self.log_observer is not None
            and hasattr(parent, "getComponent")
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        self._announce()
        try:
            super().privilegedStartService()  # type: ignore[no-untyped-call]
        except StartupError as e:
            self._failed(e)

    def startService(self) -> None:
        self._announce()
        try:
            super().startService()  # type: ignore[no-untyped-call]
        except StartupError as e:
            self._failed(e)

    def _failed(self, error: StartupError) -> None:
        if self.program is None:
            raise error
        message = f"{self.program}: {error}"
        self.log.critical("{message}", message=message)
        raise StartFailed(message) from None
