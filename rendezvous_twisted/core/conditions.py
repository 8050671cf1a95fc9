"""
RFC 9110 entity tags: parsing C{If-Match} and C{If-None-Match}, and comparing.

A header value is either C{*} or a comma-separated list of entity tags, each
C{"opaque"} or C{W/"opaque"}.  Commas are legal inside an opaque tag, so the
list is tokenised by its grammar, never split on commas.  A value that does
not parse matches nothing (SPEC.md: a garbage C{If-Match} gets 412, a garbage
C{If-None-Match} a plain 200).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# etagc = %x21 / %x23-7E / obs-text
_OPAQUE = rb'"[\x21\x23-\x7e\x80-\xff]*"'
_TAG = re.compile(rb"(W/)?(" + _OPAQUE + rb")")
# #entity-tag, with the empty list elements and optional whitespace that
# RFC 9110 section 5.6.1 asks recipients to accept.  The runs of separators
# are possessive (*+): they never give back what they took, so a long run of
# commas before a stray byte fails in linear time, not quadratic.
_LIST = re.compile(
    rb"[ \t,]*+(?:(?:W/)?"
    + _OPAQUE
    + rb"(?:[ \t]*+,[ \t,]*+(?:W/)?"
    + _OPAQUE
    + rb")*+)?[ \t,]*+\Z"
)


@dataclass(frozen=True, slots=True)
class Condition:
    """
    A parsed C{If-Match} or C{If-None-Match}: C{*}, or a list of entity tags.

    Opaque tags keep their quotes, so they compare directly with the quoted
    ETags the store mints.
    """

    any: bool
    strong: frozenset[bytes]
    weak: frozenset[bytes]

    def matches_strong(self, etag: bytes) -> bool:
        """
        RFC 9110 strong comparison, as C{If-Match} uses: a weak tag in the
        list never matches.  C{etag} is the current, strong, quoted ETag.
        """
        return self.any or etag in self.strong

    def matches_weak(self, etag: bytes) -> bool:
        """
        RFC 9110 weak comparison, as C{If-None-Match} uses: C{W/"x"} and
        C{"x"} both match C{"x"}.
        """
        return self.any or etag in self.strong or etag in self.weak


#: The condition that holds for any current representation (C{*}).
ANY = Condition(any=True, strong=frozenset(), weak=frozenset())
#: The condition no representation meets: what an unparseable value means.
NOTHING = Condition(any=False, strong=frozenset(), weak=frozenset())


def parse(values: Sequence[bytes] | None) -> Condition | None:
    """
    Parse every field line of one conditional header.

    @param values: the raw field lines, as C{Headers.getRawHeaders} returns
        them; several lines form one comma-separated list.
    @return: None when the header is absent, L{ANY} for C{*}, L{NOTHING} for
        a value that does not parse, otherwise the listed tags.
    """
    if not values:
        return None
    value = values[0] if len(values) == 1 else b",".join(values)
    if value.strip(b" \t") == b"*":
        return ANY
    if _LIST.match(value) is None:
        return NOTHING
    strong: set[bytes] = set()
    weak: set[bytes] = set()
    for prefix, opaque in _TAG.findall(value):
        (weak if prefix else strong).add(opaque)
    return Condition(any=False, strong=frozenset(strong), weak=frozenset(weak))
