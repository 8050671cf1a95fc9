"""
Numbers in words that agree with them, for log lines and messages: C{1
request}, C{2 requests}.  Free of any other module, so that the client and
the server both use it.
"""

from __future__ import annotations


def quantity(count: int, noun: str, plural: str | None = None) -> str:
    """
    C{count} and C{noun} in agreement: C{1 request}, C{2 requests}, C{0
    rendezvous} (with C{plural="rendezvous"}).
    """
    return f"{count} {noun if count == 1 else (plural or noun + 's')}"
