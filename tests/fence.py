"""
What the fence tests (test_http1_fence, test_http2_fence) share: the digest
of a dependency's source that our code overrides or relies on, and the
class a dotted path names.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any


def source_digest(thing: Any) -> str:
    """
    The first 16 hex digits of the SHA-256 of C{thing}'s source: a change
    to it, by an upgrade, changes the digest.
    """
    return hashlib.sha256(inspect.getsource(thing).encode("utf-8")).hexdigest()[:16]


def owner(path: str) -> Any:
    """
    The object a dotted path (C{"twisted.web.http.HTTPChannel"}) names.
    """
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
