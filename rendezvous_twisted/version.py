"""
What this server is: its name and version, and those of what it runs on.

The version names this package in C{rendezvous-cli --version}, C{twistd
rendezvous --version} and the first line the server logs; it is never sent
on the wire (no C{Server} header names it).
"""

from __future__ import annotations

import platform

import twisted
from rendezvous_twisted import __version__

#: The distribution's name, as pip knows it.
NAME = "rendezvous-twisted"


def version_line() -> str:
    """
    C{rendezvous-twisted 0.1.0 (Twisted 26.10.0, Python 3.11.7)}.
    """
    return (
        f"{NAME} {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"
    )
