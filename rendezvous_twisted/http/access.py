"""
The access log's event: one per answered request, in the namespace
C{rendezvous_twisted.access} (kept when this module moved: collectors
filter on it), with the fields client, method, path (ids redacted by the
caller), protocol, status, length and duration_ms, and a format shaped like
the common log format.

Besides emitting it, this module renders its text without
C{string.Formatter} (L{render}), for the text observer of L{logs}, which
writes one such line per request: rendering the format through
C{twisted.logger}'s formatter was the largest single cost of a request.
"""

from __future__ import annotations

from time import time

from twisted.logger import LogEvent, Logger, LogLevel

#: The namespace the access events are logged in (and may be filtered on).
NAMESPACE = "rendezvous_twisted.access"

#: The format of every access event, as JSON observers record it.
FORMAT = '{client} - - "{method} {path} {protocol}" {status} {length} {duration_ms:.1f}ms'

#: A module-level logger, so that its namespace stays L{NAMESPACE} (a
#: Logger class attribute takes its class' name).
_log = Logger(namespace=NAMESPACE)


def emit(
    client: str,
    method: str,
    path: str,
    protocol: str,
    status: int,
    length: int,
    duration_ms: float,
) -> None:
    """
    Log one answered request.  The caller has redacted C{path}.

    The event is the one C{_log.info(FORMAT, ...)} would emit, key for key
    (tests/test_access.py compares them), handed to the logger's observer
    as L{Logger.emit} does, but without its check that the level is one of
    L{LogLevel}'s, which sorts the levels anew for every event.
    """
    _log.observer(
        {
            "client": client,
            "method": method,
            "path": path,
            "protocol": protocol,
            "status": status,
            "length": length,
            "duration_ms": duration_ms,
            "log_logger": _log,
            "log_level": LogLevel.info,
            "log_namespace": NAMESPACE,
            "log_source": None,
            # Shaped like the common log format (the date is the event's own).
            "log_format": FORMAT,
            "log_time": time(),
        }
    )


def render(event: LogEvent) -> str | None:
    """
    The text L{twisted.logger.formatEvent} gives an event L{emit} logged,
    computed without a formatter; None for any other event (one with
    another format, or missing a field), which the caller formats as usual.
    """
    if event.get("log_format") is not FORMAT:
        return None
    try:
        # format(value, spec), as twisted.logger's formatter does.
        return (
            f'{event["client"]} - - "{event["method"]} {event["path"]} {event["protocol"]}" '
            f"{event['status']} {event['length']} {event['duration_ms']:.1f}ms"
        )
    except (KeyError, TypeError, ValueError):
        return None
