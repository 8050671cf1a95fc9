"""
Tests for L{rendezvous_twisted.core.conditions}: RFC 9110 If-Match / If-None-Match
parsing, and strong versus weak comparison.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rendezvous_twisted.core.conditions import ANY, NOTHING, Condition, parse

#: RFC 9110 etagc: %x21 / %x23-7E / obs-text (%x80-FF).
ETAGC = bytes([0x21, *range(0x23, 0x7F), *range(0x80, 0x100)])


def tags(strong: set[bytes] | None = None, weak: set[bytes] | None = None) -> Condition:
    """
    The Condition that lists exactly these strong and weak opaque tags.
    """
    return Condition(any=False, strong=frozenset(strong or ()), weak=frozenset(weak or ()))


# Absent and "*".


@pytest.mark.parametrize("values", [None, []])
def test_absent_header_is_none(values: list[bytes] | None) -> None:
    """An absent header (no field lines at all) parses to None, not to a condition."""
    assert parse(values) is None


@pytest.mark.parametrize("value", [b"*", b" *", b"* ", b"\t*\t", b"  *  "])
def test_star_is_any(value: bytes) -> None:
    """A lone `*`, with or without surrounding OWS, parses to ANY."""
    assert parse([value]) is ANY


def test_any_matches_every_etag_strongly_and_weakly() -> None:
    """ANY matches any current ETag under both strong and weak comparison."""
    for etag in (b'"a"', b'"xyzzy"', b'""'):
        assert ANY.matches_strong(etag)
        assert ANY.matches_weak(etag)


def test_nothing_matches_no_etag() -> None:
    """NOTHING matches no ETag under either comparison."""
    for etag in (b'"a"', b'""', b"*"):
        assert not NOTHING.matches_strong(etag)
        assert not NOTHING.matches_weak(etag)


# Lists.


def test_single_strong_tag() -> None:
    """A single quoted tag parses to a strong tag that keeps its quotes."""
    assert parse([b'"xyzzy"']) == tags(strong={b'"xyzzy"'})


def test_single_weak_tag() -> None:
    """A W/-prefixed tag parses to a weak tag whose opaque part keeps its quotes."""
    assert parse([b'W/"xyzzy"']) == tags(weak={b'"xyzzy"'})


def test_empty_opaque_tag() -> None:
    """The empty opaque tag `""` is a valid entity tag."""
    assert parse([b'""']) == tags(strong={b'""'})


@pytest.mark.parametrize(
    "value",
    [
        b'"a","b"',
        b'"a", "b"',
        b'"a" ,"b"',
        b'"a"\t,\t"b"',
        b' "a" , "b" ',
        b'"a",,"b"',
        b', "a", , ,"b",',
        b',,\t, "a" ,\t,  "b" ,, ',
    ],
)
def test_list_with_ows_and_empty_elements(value: bytes) -> None:
    """A list accepts OWS around commas and empty elements anywhere, as RFC 9110 5.6.1 asks."""
    assert parse([value]) == tags(strong={b'"a"', b'"b"'})


def test_mixed_strong_and_weak_list() -> None:
    """A list may mix strong and weak tags, and each lands on its own side."""
    assert parse([b'"a", W/"b", "c", W/"d"']) == tags(
        strong={b'"a"', b'"c"'}, weak={b'"b"', b'"d"'}
    )


def test_several_field_lines_form_one_list() -> None:
    """Several field lines of the header are joined into one comma-separated list."""
    assert parse([b'"a"', b'W/"b", "c"', b' "d" ']) == tags(
        strong={b'"a"', b'"c"', b'"d"'}, weak={b'"b"'}
    )


def test_empty_field_line_among_others_is_an_empty_element() -> None:
    """An empty field line among others is just an empty list element."""
    assert parse([b'"a"', b"", b'"b"']) == tags(strong={b'"a"', b'"b"'})


def test_commas_inside_an_opaque_tag() -> None:
    """A comma inside the quotes belongs to the tag: the list is not split on commas."""
    assert parse([b'"a,b", W/",", "c"']) == tags(strong={b'"a,b"', b'"c"'}, weak={b'","'})


def test_w_slash_inside_an_opaque_tag_is_opaque() -> None:
    """`W/` inside the quotes is opaque data, not a weakness marker."""
    assert parse([b'"W/"']) == tags(strong={b'"W/"'})


def test_obs_text_is_allowed_in_opaque_tags() -> None:
    """Bytes 0x80 to 0xFF (obs-text) are allowed inside an opaque tag."""
    opaque = b'"' + bytes(range(0x80, 0x100)) + b'"'
    assert parse([opaque, b"W/" + opaque]) == tags(strong={opaque}, weak={opaque})


def test_every_visible_ascii_byte_but_quote_is_allowed() -> None:
    """Every byte from 0x21 to 0x7E except the double quote is allowed inside an opaque tag."""
    opaque = b'"' + bytes([0x21, *range(0x23, 0x7F)]) + b'"'
    assert parse([opaque]) == tags(strong={opaque})


# Unparseable values match nothing.


@pytest.mark.parametrize(
    "values",
    [
        [b"xyzzy"],  # unquoted tag
        [b'"a", xyzzy'],  # unquoted tag in a list
        [b'*, "a"'],  # "*" inside a list
        [b'"a", *'],
        [b"*", b'"a"'],  # "*" as one line of a several-line list
        [b"**"],
        [b'"a" "b"'],  # two tags without a comma
        [b'"a""b"'],
        [b'"a"x'],  # stray characters
        [b'"a";'],
        [b'x"a"'],
        [b'"a" / "b"'],
        [b"W/"],  # a lone W/
        [b'"a", W/'],
        [b'w/"a"'],  # W/ is case-sensitive
        [b'W/ "a"'],  # no space after W/
        [b'W/W/"a"'],
        [b'"a"W/"b"'],
        [b'"a"b"'],  # a quote inside a tag
        [b'"a'],  # unterminated
        [b'a"'],
        [b'"'],
        [b'"a b"'],  # SP is not etagc
        [b'"a\tb"'],
        [b'"\x7f"'],  # DEL is not etagc
        [b'"\x00"'],
        [b'"a"\r\n'],  # CR LF is not OWS
        [b'"a"\n'],
        [b"\x00"],
    ],
)
def test_unparseable_values_are_nothing(values: list[bytes]) -> None:
    """A value that is neither `*` nor a list of entity tags is NOTHING: it matches nothing."""
    condition = parse(values)
    assert condition == NOTHING
    assert condition is not None
    for etag in (b'"a"', b'"b"', b'"xyzzy"', b'"a b"'):
        assert not condition.matches_strong(etag)
        assert not condition.matches_weak(etag)


# Strong versus weak comparison.


def test_strong_tag_matches_strongly_and_weakly() -> None:
    """A listed strong tag matches the same ETag under both comparisons."""
    condition = parse([b'"a"'])
    assert condition is not None
    assert condition.matches_strong(b'"a"')
    assert condition.matches_weak(b'"a"')


def test_weak_tag_never_matches_strongly() -> None:
    """A weak tag never matches under strong comparison (If-Match), even on the same opaque."""
    condition = parse([b'W/"a"'])
    assert condition is not None
    assert not condition.matches_strong(b'"a"')


def test_weak_tag_matches_weakly() -> None:
    """A weak tag matches the strong ETag with the same opaque part under weak comparison."""
    condition = parse([b'W/"a"'])
    assert condition is not None
    assert condition.matches_weak(b'"a"')


def test_unlisted_tags_do_not_match() -> None:
    """A tag that is not listed matches under neither comparison, and comparison is byte-exact."""
    condition = parse([b'"a", W/"b"'])
    assert condition is not None
    for etag in (b'"c"', b'"A"', b'"B"', b'"a "', b'"ab"', b"a", b'W/"b"'):
        assert not condition.matches_strong(etag)
        assert not condition.matches_weak(etag)


def test_comparison_against_a_list() -> None:
    """Any one listed tag is enough: strong picks only the strong ones, weak picks all."""
    condition = parse([b'"a", W/"b"', b'"c"'])
    assert condition is not None
    assert [condition.matches_strong(e) for e in (b'"a"', b'"b"', b'"c"')] == [True, False, True]
    assert [condition.matches_weak(e) for e in (b'"a"', b'"b"', b'"c"')] == [True, True, True]


def test_empty_list_matches_nothing() -> None:
    """A present header that lists no tags at all (only OWS and commas) matches nothing."""
    for value in (b"", b" ", b",", b" , ,\t"):
        condition = parse([value])
        assert condition is not None
        assert not condition.any
        assert not condition.matches_strong(b'"a"')
        assert not condition.matches_weak(b'"a"')


# Properties.

opaque_tags = st.lists(st.sampled_from(ETAGC), max_size=12).map(lambda b: b'"' + bytes(b) + b'"')
entity_tags = st.tuples(st.booleans(), opaque_tags)
ows = st.text(alphabet=" \t", max_size=3).map(lambda s: s.encode("ascii"))
# One or more commas, each with OWS either side: the separator between elements.
separators = st.lists(ows, min_size=2, max_size=4).map(b",".join)
# Zero or more commas with OWS: what may lead or trail a list.
edges = st.lists(ows, min_size=1, max_size=3).map(b",".join)


@st.composite
def formatted_lists(
    draw: st.DrawFn,
) -> tuple[list[tuple[bool, bytes]], list[bytes]]:
    """
    A list of entity tags, and field lines that spell it with random OWS,
    empty elements and line breaks between elements.
    """
    elements = draw(st.lists(entity_tags, min_size=1, max_size=8))
    # Cut the list into field lines at random element boundaries.
    cuts: list[int] = []
    if len(elements) > 1:
        cuts = sorted(draw(st.sets(st.integers(1, len(elements) - 1), max_size=3)))
    lines: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(elements)], strict=True):
        spelled = [(b"W/" if weak else b"") + opaque for weak, opaque in elements[start:end]]
        line = draw(edges)
        for i, tag in enumerate(spelled):
            line += tag + (draw(separators) if i < len(spelled) - 1 else b"")
        lines.append(line + draw(edges))
    return elements, lines


@given(formatted_lists())
def test_formatted_list_round_trips(case: tuple[list[tuple[bool, bytes]], list[bytes]]) -> None:
    """Valid tags, spelled with any OWS, empty elements and line breaks, parse to exactly those."""
    elements, lines = case
    strong = {opaque for weak, opaque in elements if not weak}
    weak = {opaque for is_weak, opaque in elements if is_weak}
    condition = parse(lines)
    assert condition == tags(strong=strong, weak=weak)
    assert condition is not None
    for opaque in strong:
        assert condition.matches_strong(opaque)
    for opaque in weak - strong:
        assert not condition.matches_strong(opaque)
        assert condition.matches_weak(opaque)


@given(st.lists(st.binary(max_size=80), max_size=4))
def test_arbitrary_bytes_never_raise(values: list[bytes]) -> None:
    """Arbitrary bytes in any number of field lines parse without raising (None only if absent)."""
    condition = parse(values)
    if not values:
        assert condition is None
        return
    assert isinstance(condition, Condition)
    condition.matches_strong(b'"a"')
    condition.matches_weak(b'"a"')
    # Every tag found is a well-formed quoted opaque tag.
    for opaque in condition.strong | condition.weak:
        assert opaque.startswith(b'"')
        assert opaque.endswith(b'"')
        assert len(opaque) >= 2
        assert all(byte in ETAGC for byte in opaque[1:-1])


@given(
    st.lists(entity_tags, min_size=1, max_size=4),
    st.sampled_from([b"x", b'"', b"*", b"W/", b";", b"\\", b"\x00", b"\r\n"]),
)
def test_stray_bytes_after_a_valid_list_make_it_nothing(
    elements: list[tuple[bool, bytes]], stray: bytes
) -> None:
    """A valid list followed by bytes that cannot continue it makes the whole value NOTHING."""
    spelled = b", ".join((b"W/" if weak else b"") + opaque for weak, opaque in elements)
    assert parse([spelled + b", " + stray]) == NOTHING
    assert parse([spelled + stray]) == NOTHING


# Regex backtracking guard.

SIXTEEN_KIB = 16 * 1024


@pytest.mark.parametrize(
    "value",
    [
        # Overlapping separator runs once made this one backtrack
        # quadratically: about 2 s of CPU for one 16 KiB header.
        pytest.param((b", " * SIXTEEN_KIB)[: SIXTEEN_KIB - 1] + b"x", id="ows-commas-then-stray"),
        pytest.param(b'"a"' + b" ," * (SIXTEEN_KIB // 2 - 2) + b"x", id="tag-commas-then-stray"),
        pytest.param(b'"a",' * (SIXTEEN_KIB // 4 - 1) + b"x", id="many-tags-then-stray"),
        pytest.param(b"W/" * (SIXTEEN_KIB // 2), id="many-w-slash"),
        pytest.param(b'"' + b"a" * (SIXTEEN_KIB - 1), id="unterminated-tag"),
        pytest.param(b'"a" ' * (SIXTEEN_KIB // 4), id="tags-without-commas"),
    ],
)
def test_pathological_16_kib_header_parses_quickly(value: bytes) -> None:
    """A 16 KiB garbage header (Twisted's header limit) parses to NOTHING in well under a second."""
    assert len(value) <= SIXTEEN_KIB
    assert len(value) > SIXTEEN_KIB - 8
    start = time.perf_counter()
    condition = parse([value])
    elapsed = time.perf_counter() - start
    assert condition == NOTHING
    assert elapsed < 0.5, f"parsing took {elapsed:.3f} s"
