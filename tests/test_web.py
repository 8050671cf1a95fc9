"""
The HTTP contract of SPEC.md, one rule at a time, against the real Klein
resource in memory (StubTreq), with time on a Clock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from io import BytesIO
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, capturedLogs, formatEvent

from rendezvous_twisted.http.answers import EVERY_RESPONSE, PREFLIGHT
from rendezvous_twisted.http.site import redact
from rendezvous_twisted.protocols.common import prefer_wait

from .conftest import BASE, EPOCH, Answer, Harness, answered, fired

CORS = {
    "access-control-allow-origin": b"*",
    "access-control-expose-headers": (
        b"ETag, Location, X-Max-Bytes, Expires, Last-Modified, Retry-After"
    ),
}
NO_CACHE = {"cache-control": b"no-store, no-transform", "pragma": b"no-cache"}


def http_date(seconds: float) -> bytes:
    from twisted.web.http import datetimeToString

    date: bytes = datetimeToString(int(seconds))
    return date


def assert_every_response_headers(answer: Answer) -> None:
    for name, value in {**CORS, **NO_CACHE, "x-content-type-options": b"nosniff"}.items():
        assert answer.header(name) == value, (name, answer)
    assert answer.header("content-type") is not None
    if answer.code in (204, 304):
        assert answer.body == b""
    else:
        # Framed by Content-Length, never chunked.  (Raw bytes on the wire,
        # and no Content-Length on 204 and 304, are pinned end to end.)
        assert answer.length == len(answer.body)


def assert_json_error(answer: Answer, code: int, errcode: str) -> None:
    assert answer.code == code, answer
    assert answer.header("content-type") == b"application/json"
    error = answer.json()
    assert error["errcode"] == errcode
    assert isinstance(error["error"], str) and error["error"]
    assert_every_response_headers(answer)


def assert_rendezvous_headers(answer: Answer, etag: bytes, expires: float, modified: float) -> None:
    assert answer.header("etag") == etag
    assert answer.header("expires") == http_date(expires)
    assert answer.header("last-modified") == http_date(modified)


# POST / — create.


def test_create_answers_200_json_with_id_and_max_bytes(harness: Harness) -> None:
    """POST / answers 200 with application/json {id, max_bytes}."""
    answer = harness.call("POST", "/", b"hello")
    assert answer.code == 200
    assert answer.header("content-type") == b"application/json"
    body = answer.json()
    assert set(body) == {"id", "max_bytes"}
    assert isinstance(body["id"], str) and len(body["id"]) >= 22
    assert body["max_bytes"] == 10240
    assert_every_response_headers(answer)


def test_create_carries_etag_expires_last_modified(harness: Harness) -> None:
    """The create answer carries ETag, Expires (created + TTL) and Last-Modified."""
    answer = harness.call("POST", "/", b"hello")
    etag = answer.header("etag")
    assert etag is not None and etag.startswith(b'"')
    assert_rendezvous_headers(answer, etag, EPOCH + 60, EPOCH)


def test_create_carries_absolute_location_from_request_host(harness: Harness) -> None:
    """Without a public URL, Location is the request's scheme and Host joined with the id."""
    rendezvous_id, answer = harness.create()
    assert answer.header("location") == f"{BASE}/{rendezvous_id}".encode()


def test_create_location_uses_public_url_with_prefix() -> None:
    """With a public URL, Location is that base (path prefix included) joined with the id."""
    harness = Harness(public_url="https://qr.example.org/rendezvous/")
    rendezvous_id, answer = harness.create()
    assert answer.header("location") == (
        f"https://qr.example.org/rendezvous/{rendezvous_id}".encode()
    )


@pytest.mark.parametrize(
    "host", ["evil.example\x00", "a b", "x/y", "[::1", "host:port", "a@b", "\u00e9.example"]
)
def test_location_never_built_from_a_malformed_host(harness: Harness, host: str) -> None:
    """A Host header unfit for a URL is not copied into Location (nor does it fail the create)."""
    answer = harness.call("POST", "/", b"x", headers={"Host": host.encode("latin-1")})
    if answer.code == 200:
        location = answer.header("location")
        assert location is not None
        assert location.startswith(b"http://") and host.encode("latin-1") not in location
    else:
        assert_json_error(answer, 400, "M_BAD_REQUEST")


def test_location_keeps_a_well_formed_host_with_port(harness: Harness) -> None:
    """A Host of name and port, or an IPv6 literal, is used as given."""
    for host in ["rv.example:8443", "[2001:db8::1]:8080", "192.0.2.7"]:
        answer = harness.call("POST", "/", b"x", headers={"Host": host})
        location = answer.header("location")
        assert location is not None and location.startswith(f"http://{host}/".encode())


def test_create_carries_x_max_bytes() -> None:
    """The create answer carries X-Max-Bytes with the server's limit."""
    harness = Harness(max_bytes=4096)
    _, answer = harness.create(b"x")
    assert answer.header("x-max-bytes") == b"4096"
    assert answer.json()["max_bytes"] == 4096


def test_create_without_content_type_stores_octet_stream(harness: Harness) -> None:
    """A payload created without Content-Type reads back as application/octet-stream."""
    rendezvous_id, _ = harness.create(b"raw")
    answer = harness.call("GET", f"/{rendezvous_id}")
    assert answer.header("content-type") == b"application/octet-stream"


def test_create_with_empty_body_is_allowed(harness: Harness) -> None:
    """An empty payload is a payload: create succeeds and GET returns zero bytes."""
    rendezvous_id, _ = harness.create(b"")
    answer = harness.call("GET", f"/{rendezvous_id}")
    assert (answer.code, answer.body, answer.length) == (200, b"", 0)


def test_create_oversize_is_413() -> None:
    """A create over max_bytes gets 413 with a JSON error, and nothing is stored."""
    harness = Harness(max_bytes=10)
    assert_json_error(harness.call("POST", "/", b"x" * 11), 413, "M_TOO_LARGE")
    assert harness.store.rendezvous_count == 0


def test_create_at_global_cap_is_429_with_retry_after() -> None:
    """A full server answers 429 with Retry-After and keeps every live rendezvous."""
    harness = Harness(max_rendezvous=2, max_rendezvous_per_address=2)
    ids = [harness.create(b"keep")[0] for _ in range(2)]
    harness.advance(20)
    answer = harness.call("POST", "/", b"x")
    assert_json_error(answer, 429, "M_LIMIT_EXCEEDED")
    assert answer.header("retry-after") == b"40"
    for rendezvous_id in ids:
        assert harness.call("GET", f"/{rendezvous_id}").body == b"keep"


def test_create_at_per_address_cap_is_429_with_retry_after() -> None:
    """A client address at its cap gets 429 with Retry-After."""
    harness = Harness(max_rendezvous_per_address=1)
    harness.create()
    answer = harness.call("POST", "/", b"x")
    assert_json_error(answer, 429, "M_LIMIT_EXCEEDED")
    assert answer.header("retry-after") == b"60"


# PUT /<id> — write.


def test_write_answers_202_with_new_etag_expires_last_modified(harness: Harness) -> None:
    """PUT answers 202, with the new ETag, the unchanged Expires and a new Last-Modified."""
    rendezvous_id, created = harness.create()
    harness.advance(5)
    answer = harness.call("PUT", f"/{rendezvous_id}", b"next")
    assert answer.code == 202
    etag = answer.header("etag")
    assert etag is not None and etag != created.header("etag")
    assert_rendezvous_headers(answer, etag, EPOCH + 60, EPOCH + 5)
    assert_every_response_headers(answer)


def test_write_empty_202_still_has_content_type(harness: Harness) -> None:
    """The empty 202 carries a Content-Type and Content-Length: 0."""
    rendezvous_id, _ = harness.create()
    answer = harness.call("PUT", f"/{rendezvous_id}", b"next")
    assert answer.body == b""
    assert answer.header("content-type") == b"application/json"
    assert answer.length == 0


def test_write_without_if_match_is_unconditional(harness: Harness) -> None:
    """A PUT without If-Match is treated as If-Match: * and succeeds."""
    rendezvous_id, _ = harness.create()
    assert harness.call("PUT", f"/{rendezvous_id}", b"a").code == 202
    assert harness.call("PUT", f"/{rendezvous_id}", b"b").code == 202
    assert harness.call("GET", f"/{rendezvous_id}").body == b"b"


def test_write_without_content_type_stores_octet_stream(harness: Harness) -> None:
    """A PUT without Content-Type stores application/octet-stream."""
    rendezvous_id, _ = harness.create(headers={"Content-Type": "text/plain"})
    harness.call("PUT", f"/{rendezvous_id}", b"x")
    answer = harness.call("GET", f"/{rendezvous_id}")
    assert answer.header("content-type") == b"application/octet-stream"


@pytest.mark.parametrize(
    "if_match",
    [
        "{etag}",
        '"nope", {etag}',
        "*",
        " , {etag} ,",
    ],
)
def test_write_with_matching_if_match_succeeds(harness: Harness, if_match: str) -> None:
    """If-Match with the current ETag, in a list or as *, lets the write through."""
    rendezvous_id, created = harness.create()
    etag = created.header("etag")
    assert etag is not None
    header = if_match.format(etag=etag.decode())
    answer = harness.call("PUT", f"/{rendezvous_id}", b"x", headers={"If-Match": header})
    assert answer.code == 202


def test_write_with_if_match_over_several_lines_succeeds(harness: Harness) -> None:
    """Several If-Match field lines form one list."""
    rendezvous_id, created = harness.create()
    etag = created.header("etag")
    assert etag is not None
    answer = harness.call(
        "PUT", f"/{rendezvous_id}", b"x", headers={"If-Match": [b'"other"', etag]}
    )
    assert answer.code == 202


@pytest.mark.parametrize(
    "if_match", ['"stale"', "W/{etag}", "garbage", "{etag}x", '"a" "b"', "*, {etag}", ""]
)
def test_write_with_failing_if_match_is_412_with_current_headers(
    harness: Harness, if_match: str
) -> None:
    """A stale, weak or garbage If-Match gets 412 with the current ETag, Expires, Last-Modified."""
    rendezvous_id, created = harness.create()
    etag = created.header("etag")
    assert etag is not None
    header = if_match.format(etag=etag.decode())
    answer = harness.call("PUT", f"/{rendezvous_id}", b"x", headers={"If-Match": header})
    assert_json_error(answer, 412, "M_CONCURRENT_WRITE")
    assert_rendezvous_headers(answer, etag, EPOCH + 60, EPOCH)
    assert harness.call("GET", f"/{rendezvous_id}").body == b"hello"


def test_racing_writers_have_exactly_one_winner(harness: Harness) -> None:
    """Two PUTs with the same If-Match, sent together: one 202, one 412."""
    rendezvous_id, created = harness.create()
    etag = created.header("etag")
    assert etag is not None
    first = harness.send("PUT", f"/{rendezvous_id}", b"A", headers={"If-Match": etag})
    second = harness.send("PUT", f"/{rendezvous_id}", b"B", headers={"If-Match": etag})
    harness.flush()
    codes = sorted([fired(first).code, fired(second).code])
    assert codes == [202, 412]


def test_write_unknown_is_404(harness: Harness) -> None:
    """A PUT to an unknown id gets 404 with a JSON error."""
    answer = harness.call("PUT", "/AAAAAAAAAAAAAAAAAAAAAA", b"x")
    assert_json_error(answer, 404, "M_NOT_FOUND")


def test_write_oversize_is_413_and_keeps_payload() -> None:
    """A PUT over max_bytes gets 413 and the payload is unchanged."""
    harness = Harness(max_bytes=5)
    rendezvous_id, _ = harness.create(b"12345")
    assert_json_error(harness.call("PUT", f"/{rendezvous_id}", b"123456"), 413, "M_TOO_LARGE")
    assert harness.call("GET", f"/{rendezvous_id}").body == b"12345"


def test_content_type_over_its_cap_is_400(harness: Harness) -> None:
    """A Content-Type longer than the cap is refused with 400, so headers cannot bloat memory."""
    answer = harness.call("POST", "/", b"x", headers={"Content-Type": "a/" + "b" * 300})
    assert_json_error(answer, 400, "M_INVALID_PARAM")


def test_repeated_content_type_is_400(harness: Harness) -> None:
    """Two Content-Type lines are ambiguous and refused with 400."""
    answer = harness.call("POST", "/", b"x", headers={"Content-Type": ["a/b", "c/d"]})
    assert_json_error(answer, 400, "M_INVALID_PARAM")


# GET /<id> — read.


def test_read_answers_200_with_payload_and_headers(harness: Harness) -> None:
    """GET answers 200 with the bytes, ETag, Expires, Last-Modified and the sandbox CSP."""
    rendezvous_id, created = harness.create(b"\x00payload\xff")
    answer = harness.call("GET", f"/{rendezvous_id}")
    assert (answer.code, answer.body) == (200, b"\x00payload\xff")
    etag = created.header("etag")
    assert etag is not None
    assert_rendezvous_headers(answer, etag, EPOCH + 60, EPOCH)
    assert answer.header("content-security-policy") == b"sandbox; default-src 'none'"
    assert_every_response_headers(answer)


@pytest.mark.parametrize(
    "content_type",
    [
        b"text/plain",
        b"Text/Plain;Charset=UTF-8",
        b"application/json; charset=utf-8",
        b'multipart/x;  boundary="a b"',
        b"x/\xe9\xff",
    ],
)
def test_read_echoes_content_type_byte_for_byte(harness: Harness, content_type: bytes) -> None:
    """The stored Content-Type comes back exactly as the writer sent it, nothing added."""
    rendezvous_id, _ = harness.create(b"x", headers={"Content-Type": content_type})
    assert harness.call("GET", f"/{rendezvous_id}").header("content-type") == content_type
    harness.call("PUT", f"/{rendezvous_id}", b"y", headers={"Content-Type": content_type})
    assert harness.call("GET", f"/{rendezvous_id}").header("content-type") == content_type


@pytest.mark.parametrize(
    "headers", [{"Sec-Fetch-Mode": "navigate"}, {"Sec-Fetch-Dest": "document"}]
)
def test_top_level_navigation_is_403(harness: Harness, headers: dict[str, str]) -> None:
    """A browser navigating to a rendezvous gets 403, so payloads cannot be hosted as pages."""
    rendezvous_id, _ = harness.create(
        b"<script>alert(1)</script>", headers={"Content-Type": "text/html"}
    )
    answer = harness.call("GET", f"/{rendezvous_id}", headers=headers)
    assert_json_error(answer, 403, "M_FORBIDDEN")
    assert b"script" not in answer.body


def test_fetch_from_a_page_is_served(harness: Harness) -> None:
    """A fetch() from a page (Sec-Fetch-Mode: cors) is served normally."""
    rendezvous_id, _ = harness.create()
    answer = harness.call(
        "GET", f"/{rendezvous_id}", headers={"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
    )
    assert answer.code == 200


def test_read_unknown_is_404(harness: Harness) -> None:
    """A GET of an unknown id gets 404 with a JSON error."""
    assert_json_error(harness.call("GET", "/AAAAAAAAAAAAAAAAAAAAAA"), 404, "M_NOT_FOUND")


def test_read_expired_is_404() -> None:
    """A GET after the TTL gets 404."""
    harness = Harness(ttl_seconds=30)
    rendezvous_id, _ = harness.create()
    harness.advance(30)
    assert_json_error(harness.call("GET", f"/{rendezvous_id}"), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("if_none_match", ['"other"', "garbage", 'W/"x", "y"'])
def test_read_with_non_matching_if_none_match_is_200_at_once(
    harness: Harness, if_none_match: str
) -> None:
    """If-None-Match that does not match (or does not parse) gets a plain 200 at once."""
    rendezvous_id, _ = harness.create()
    answer = harness.call("GET", f"/{rendezvous_id}", headers={"If-None-Match": if_none_match})
    assert (answer.code, answer.body) == (200, b"hello")


# DELETE /<id>.


def test_delete_answers_204_and_forgets(harness: Harness) -> None:
    """DELETE answers 204 and the rendezvous is then 404 for every method."""
    rendezvous_id, _ = harness.create()
    answer = harness.call("DELETE", f"/{rendezvous_id}")
    assert answer.code == 204
    assert_every_response_headers(answer)
    assert harness.call("GET", f"/{rendezvous_id}").code == 404
    assert harness.call("PUT", f"/{rendezvous_id}", b"x").code == 404
    assert_json_error(harness.call("DELETE", f"/{rendezvous_id}"), 404, "M_NOT_FOUND")


# Long-polling.


def long_poll(harness: Harness, rendezvous_id: str, etag: bytes, **headers: str) -> Any:
    return harness.send("GET", f"/{rendezvous_id}", headers={"If-None-Match": etag, **headers})


def created_etag(answer: Answer) -> bytes:
    etag = answer.header("etag")
    assert etag is not None
    return etag


def test_matching_if_none_match_is_parked_and_woken_by_put(harness: Harness) -> None:
    """A GET whose If-None-Match matches is parked until the next PUT, then gets its payload."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(5)
    assert not answered(d)
    put = harness.call("PUT", f"/{rendezvous_id}", b"from B", headers={"Content-Type": "text/x-b"})
    harness.flush()
    answer: Answer = fired(d)
    assert (answer.code, answer.body) == (200, b"from B")
    assert answer.header("content-type") == b"text/x-b"
    assert answer.header("etag") == put.header("etag")
    assert_every_response_headers(answer)


def test_long_poll_answer_is_dated_when_answered_not_when_asked(harness: Harness) -> None:
    """A parked GET answered later carries the Date of its answer, not of its arrival."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(7)
    harness.call("PUT", f"/{rendezvous_id}", b"from B")
    harness.flush()
    answer: Answer = fired(d)
    date = answer.header("date")
    assert date is not None
    assert parsedate_to_datetime(date.decode("ascii")).timestamp() == EPOCH + 7


def test_parked_reader_answered_404_is_dated_when_answered(harness: Harness) -> None:
    """A parked GET answered 404 by a later DELETE carries the Date of that answer."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(3)
    harness.call("DELETE", f"/{rendezvous_id}")
    harness.flush()
    answer: Answer = fired(d)
    date = answer.header("date")
    assert answer.code == 404 and date is not None
    assert parsedate_to_datetime(date.decode("ascii")).timestamp() == EPOCH + 3


def test_put_answers_every_parked_reader(harness: Harness) -> None:
    """One PUT answers every parked reader of the rendezvous with 200."""
    rendezvous_id, created = harness.create()
    waits = [long_poll(harness, rendezvous_id, created_etag(created)) for _ in range(3)]
    harness.call("PUT", f"/{rendezvous_id}", b"new")
    harness.flush()
    assert [fired(d).body for d in waits] == [b"new"] * 3


def test_poll_timeout_answers_304_with_headers() -> None:
    """A parked GET that sees no write gets 304 with ETag, Expires, Last-Modified at the timeout."""
    harness = Harness(poll_timeout_seconds=20)
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(19.9)
    assert not answered(d)
    harness.advance(0.1)
    answer: Answer = fired(d)
    assert answer.code == 304
    assert_rendezvous_headers(answer, created_etag(created), EPOCH + 60, EPOCH)
    assert_every_response_headers(answer)


def test_default_poll_timeout_is_20_seconds(harness: Harness) -> None:
    """Without configuration a parked GET is held 20 seconds."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(19.99)
    assert not answered(d)
    harness.advance(0.01)
    assert fired(d).code == 304


def test_delete_answers_parked_reader_404(harness: Harness) -> None:
    """A DELETE answers parked readers with 404."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.call("DELETE", f"/{rendezvous_id}")
    harness.flush()
    assert_json_error(fired(d), 404, "M_NOT_FOUND")


def test_expiry_answers_parked_reader_404_never_304_past_expiry() -> None:
    """A wait that would outlast the rendezvous ends with its expiry: 404 at the expiry."""
    harness = Harness(ttl_seconds=60, poll_timeout_seconds=20)
    rendezvous_id, created = harness.create()
    harness.advance(50)
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.advance(9.9)
    assert not answered(d)
    harness.advance(0.1)
    assert_json_error(fired(d), 404, "M_NOT_FOUND")


def test_prefer_wait_caps_the_wait() -> None:
    """Prefer: wait=N answers 304 after N seconds when N is under the poll timeout."""
    harness = Harness(poll_timeout_seconds=20)
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created), Prefer="wait=3")
    harness.advance(2.9)
    assert not answered(d)
    harness.advance(0.1)
    assert fired(d).code == 304


def test_prefer_wait_cannot_extend_past_poll_timeout() -> None:
    """Prefer: wait longer than the poll timeout is held only for the poll timeout."""
    harness = Harness(poll_timeout_seconds=5)
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created), Prefer="wait=100")
    harness.advance(5)
    assert fired(d).code == 304


def test_prefer_wait_zero_answers_304_at_once(harness: Harness) -> None:
    """Prefer: wait=0 answers a matching If-None-Match with an immediate 304."""
    rendezvous_id, created = harness.create()
    answer: Answer = fired(
        long_poll(harness, rendezvous_id, created_etag(created), Prefer="wait=0")
    )
    assert answer.code == 304
    assert_rendezvous_headers(answer, created_etag(created), EPOCH + 60, EPOCH)
    assert harness.store.parked_count == 0


@pytest.mark.parametrize(
    ("values", "seconds"),
    [
        ([b"wait=5"], 5.0),
        ([b"respond-async, wait=7"], 7.0),
        ([b"WAIT = 3 ; x=y"], 3.0),
        ([b'wait="4"'], 4.0),
        ([b"handling=lenient", b"wait=2"], 2.0),
        ([b"wait=2, wait=9"], 2.0),
        ([b"wait=abc"], None),
        ([b"wait=-1"], None),
        ([b"nowait=3"], None),
        ([b"wait"], None),
        (None, None),
    ],
)
def test_prefer_wait_parsing(values: list[bytes] | None, seconds: float | None) -> None:
    """Prefer is read per RFC 7240: the first wait counts, junk is ignored."""
    assert prefer_wait(values) == seconds


def test_weak_if_none_match_parks(harness: Harness) -> None:
    """If-None-Match compares weakly: W/<current etag> parks the reader."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, b"W/" + created_etag(created), Prefer="wait=1")
    assert not answered(d)
    harness.advance(1)
    assert fired(d).code == 304


def test_star_if_none_match_parks(harness: Harness) -> None:
    """If-None-Match: * parks the reader until the next write."""
    rendezvous_id, _ = harness.create()
    d = long_poll(harness, rendezvous_id, b"*")
    assert not answered(d)
    harness.call("PUT", f"/{rendezvous_id}", b"z")
    harness.flush()
    assert fired(d).body == b"z"


def test_client_disconnect_while_parked_leaves_nothing_behind(harness: Harness) -> None:
    """A client that hangs up while parked is dropped at once, with its timer."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    assert harness.store.parked_count == 1
    d.cancel()
    d.addErrback(lambda failure: None)
    harness.flush()
    assert harness.store.parked_count == 0
    assert len(harness.clock.getDelayedCalls()) == 1  # only the expiry
    # The rendezvous still serves.
    assert harness.call("PUT", f"/{rendezvous_id}", b"after").code == 202


def test_shutdown_answers_parked_readers_304(harness: Harness) -> None:
    """Shutting down answers every parked reader with 304, so clients poll again."""
    rendezvous_id, created = harness.create()
    d = long_poll(harness, rendezvous_id, created_etag(created))
    harness.store.shutdown()
    harness.flush()
    answer: Answer = fired(d)
    assert answer.code == 304
    assert answer.header("etag") == created_etag(created)


def test_parked_cap_per_rendezvous_is_429() -> None:
    """Past the per-rendezvous cap of parked readers a GET gets 429 with Retry-After."""
    harness = Harness(max_parked_per_rendezvous=1)
    rendezvous_id, created = harness.create()
    long_poll(harness, rendezvous_id, created_etag(created))
    answer: Answer = fired(long_poll(harness, rendezvous_id, created_etag(created)))
    assert_json_error(answer, 429, "M_LIMIT_EXCEEDED")
    assert answer.header("retry-after") == b"20"


def test_parked_cap_global_is_429() -> None:
    """Past the server-wide cap of parked readers a GET gets 429 with Retry-After."""
    harness = Harness(max_parked=1, max_parked_per_rendezvous=1)
    first, one = harness.create()
    second, two = harness.create()
    long_poll(harness, first, created_etag(one))
    answer: Answer = fired(long_poll(harness, second, created_etag(two)))
    assert_json_error(answer, 429, "M_LIMIT_EXCEEDED")
    assert answer.header("retry-after") is not None


# ETags and times.


def test_identical_writes_get_new_etags(harness: Harness) -> None:
    """Writing the same bytes again yields a new ETag, and a parked reader sees the change."""
    rendezvous_id, created = harness.create(b"same")
    d = long_poll(harness, rendezvous_id, created_etag(created))
    put = harness.call("PUT", f"/{rendezvous_id}", b"same")
    harness.flush()
    assert put.header("etag") != created_etag(created)
    assert fired(d).code == 200


def test_last_modified_has_one_second_resolution(harness: Harness) -> None:
    """Last-Modified and Expires are IMF-fixdate HTTP-dates, whole seconds."""
    harness.advance(0.75)
    _, created = harness.create()
    for name in ("last-modified", "expires"):
        value = created.header(name)
        assert value is not None and value.endswith(b" GMT")
        parsed = parsedate_to_datetime(value.decode())
        assert parsed.microsecond == 0
    assert created.header("last-modified") == http_date(EPOCH)


def test_expires_is_fixed_at_creation(harness: Harness) -> None:
    """Writes do not move Expires."""
    rendezvous_id, created = harness.create()
    harness.advance(30)
    put = harness.call("PUT", f"/{rendezvous_id}", b"x")
    assert put.header("expires") == created.header("expires") == http_date(EPOCH + 60)


# CORS.


@pytest.mark.parametrize("path", ["/", "/AAAAAAAAAAAAAAAAAAAAAA", "/bad id", "/a/b/c", "/%ff"])
def test_preflight_succeeds_for_any_path(harness: Harness, path: str) -> None:
    """OPTIONS on any path answers 204 with the CORS preflight headers."""
    answer = harness.call("OPTIONS", path)
    assert answer.code == 204
    for name, value in PREFLIGHT:
        assert answer.header(name.decode()) == value
    assert_every_response_headers(answer)


def test_preflight_on_a_known_and_an_expired_rendezvous(harness: Harness) -> None:
    """OPTIONS on a live and on an expired rendezvous both answer 204."""
    rendezvous_id, _ = harness.create()
    assert harness.call("OPTIONS", f"/{rendezvous_id}").code == 204
    harness.advance(61)
    assert harness.call("OPTIONS", f"/{rendezvous_id}").code == 204


def test_preflight_headers_are_the_specs() -> None:
    """The preflight allows SPEC.md's methods and headers and caches for a day."""
    assert dict(PREFLIGHT) == {
        b"Access-Control-Allow-Methods": b"GET, PUT, POST, DELETE",
        b"Access-Control-Allow-Headers": (
            b"Authorization, Content-Type, If-Match, If-None-Match, Prefer"
        ),
        b"Access-Control-Max-Age": b"86400",
    }


def test_every_response_header_list_is_the_specs() -> None:
    """The headers put on every response are SPEC.md's CORS, cache and sniffing headers."""
    headers = {name.decode().lower(): value for name, value in EVERY_RESPONSE}
    for name, value in {**CORS, **NO_CACHE, "x-content-type-options": b"nosniff"}.items():
        assert headers[name] == value


def test_every_kind_of_answer_carries_cors_and_cache_headers() -> None:
    """Every status the server sends carries the every-response headers."""
    harness = Harness(max_rendezvous_per_address=2, max_bytes=100)
    rendezvous_id, created = harness.create()
    path = f"/{rendezvous_id}"
    etag = created_etag(created)
    harness.create()
    answers = {
        200: harness.call("GET", path),
        202: harness.call("PUT", path, b"x"),
        304: fired(long_poll(harness, rendezvous_id, b"*", Prefer="wait=0")),
        400: harness.call("POST", "/", b"x", headers={"Content-Type": ["a/b", "c/d"]}),
        403: harness.call("GET", path, headers={"Sec-Fetch-Mode": "navigate"}),
        404: harness.call("GET", "/nope"),
        405: harness.call("PATCH", path),
        412: harness.call("PUT", path, b"y", headers={"If-Match": etag}),
        413: harness.call("PUT", path, b"y" * 101),
        429: harness.call("POST", "/", b"x"),
        204: harness.call("DELETE", path),
    }
    for code, answer in answers.items():
        assert answer.code == code, answer
        assert_every_response_headers(answer)


# Bad input.


@pytest.mark.parametrize(
    "path", ["/a/b", "/AAAAAAAAAAAAAAAAAAAAAA/", "/x/AAAAAAAAAAAAAAAAAAAAAA", "//"]
)
@pytest.mark.parametrize("method", ["GET", "PUT", "POST", "DELETE"])
def test_unknown_paths_are_404_json(harness: Harness, path: str, method: str) -> None:
    """Paths other than / and /<id> get 404 with a JSON error, never a redirect."""
    answer = harness.call(method, path, b"")
    assert_json_error(answer, 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    "rendezvous_id",
    ["short", "has.dot", "has~tilde", "A" * 65, "A" * 10000, "%00" * 20, "%ff" * 20],
)
def test_malformed_ids_are_404(harness: Harness, rendezvous_id: str) -> None:
    """Malformed or huge ids are as unknown as any other id: 404 with a JSON error."""
    answer = harness.call("GET", "/" + rendezvous_id)
    assert answer.code == 404
    assert_every_response_headers(answer)
    assert answer.json()["errcode"] in ("M_NOT_FOUND", "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    ("path", "method", "allow"),
    [
        ("/", "GET", b"POST, OPTIONS"),
        ("/", "PUT", b"POST, OPTIONS"),
        ("/", "DELETE", b"POST, OPTIONS"),
        ("/", "HEAD", b"POST, OPTIONS"),
        ("/AAAAAAAAAAAAAAAAAAAAAA", "POST", b"GET, PUT, DELETE, OPTIONS"),
        ("/AAAAAAAAAAAAAAAAAAAAAA", "PATCH", b"GET, PUT, DELETE, OPTIONS"),
        ("/AAAAAAAAAAAAAAAAAAAAAA", "HEAD", b"GET, PUT, DELETE, OPTIONS"),
        ("/AAAAAAAAAAAAAAAAAAAAAA", "TRACE", b"GET, PUT, DELETE, OPTIONS"),
        ("/AAAAAAAAAAAAAAAAAAAAAA", "BREW", b"GET, PUT, DELETE, OPTIONS"),
    ],
)
def test_wrong_method_is_405_with_allow(
    harness: Harness, path: str, method: str, allow: bytes
) -> None:
    """A method the path does not serve gets 405, an Allow header and a JSON error."""
    assert_wrong_method(harness, method, path, allow)


def assert_wrong_method(harness: Harness, method: str, path: str, allow: bytes) -> None:
    """
    C{method} on C{path} is 405 with C{Allow: allow}, and a JSON error (HEAD: no body).
    """
    answer = harness.call(method, path)
    assert answer.code == 405
    assert answer.header("allow") == allow
    if method != "HEAD":
        assert_json_error(answer, 405, "M_UNRECOGNIZED")


def test_get_on_the_root_says_what_the_root_is_for(harness: Harness) -> None:
    """GET / (a newcomer's first probe) gets a 405 whose message says POST / creates."""
    answer = harness.call("GET", "/")
    assert_json_error(answer, 405, "M_UNRECOGNIZED")
    assert "POST / creates a rendezvous" in answer.json()["error"]


def test_bad_requests_do_not_disturb_other_rendezvous(harness: Harness) -> None:
    """A stream of bad requests leaves another client's rendezvous and parked reader intact."""
    rendezvous_id, created = harness.create(b"precious")
    d = long_poll(harness, rendezvous_id, created_etag(created))
    for method, path, headers in [
        ("PUT", f"/{rendezvous_id}", {"If-Match": "garbage"}),
        ("PUT", f"/{rendezvous_id}", {"Content-Type": ["a", "b"]}),
        ("GET", f"/{rendezvous_id}", {"Sec-Fetch-Dest": "document"}),
        ("GET", f"/{rendezvous_id}", {"If-None-Match": '"' * 1000}),
        ("GET", f"/{rendezvous_id}", {"Prefer": "wait=" + "9" * 100}),
        ("PATCH", f"/{rendezvous_id}", {}),
        ("GET", "/%ff%fe", {}),
        ("GET", f"/{rendezvous_id}/../x", {}),
        ("POST", "/", {"Host": "\xff"}),
    ]:
        answer = harness.call(method, path, b"junk", headers=headers)
        assert 400 <= answer.code < 500 or answer.code == 200, (method, path, answer)
    assert not answered(d)
    assert harness.call("GET", f"/{rendezvous_id}").body == b"precious"


def test_unusable_host_is_400_json(harness: Harness) -> None:
    """A Host header that cannot be decoded gets 400 with a JSON error, not a 500."""
    for host in [b"\xff\xfe", b"a" * 64 + b".example"]:
        answer = harness.call("POST", "/", b"x", headers={"Host": host})
        assert_json_error(answer, 400, "M_BAD_REQUEST")


def test_unexpected_errors_are_500_json_and_logged(harness: Harness) -> None:
    """A bug in the server answers 500 with a JSON error (no traceback) and logs the failure."""

    def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    harness.store.read = broken  # type: ignore[method-assign,assignment]
    rendezvous_id, _ = harness.create()
    with capturedLogs() as events:
        answer = harness.call("GET", f"/{rendezvous_id}")
    assert_json_error(answer, 500, "M_UNKNOWN")
    assert b"a bug" not in answer.body and b"Traceback" not in answer.body
    assert any(event.get("log_failure") is not None for event in events)


# Logs.


def test_payloads_and_ids_are_never_logged() -> None:
    """A whole exchange logs neither payload bytes nor any rendezvous id."""
    events: Sequence[LogEvent]
    with capturedLogs() as events:
        harness = Harness()
        rendezvous_id, created = harness.create(b"SECRET-PAYLOAD-A")
        d = long_poll(harness, rendezvous_id, created_etag(created))
        harness.call("PUT", f"/{rendezvous_id}", b"SECRET-PAYLOAD-B")
        harness.flush()
        fired(d)
        harness.call("DELETE", f"/{rendezvous_id}")
        harness.advance(120)
    text = "\n".join(formatEvent(event) + repr(event) for event in events)
    assert "SECRET-PAYLOAD" not in text
    assert rendezvous_id not in text


def test_access_log_names_rendezvous_by_hash_only() -> None:
    """Each request gets an access-log line, naming a rendezvous only by a short hash."""
    harness = Harness()
    rendezvous_id, _ = harness.create()
    with capturedLogs() as events:
        harness.call("GET", f"/{rendezvous_id}?token=SECRET")
    lines = [formatEvent(event) for event in events]
    expected = f'"GET /~{redact(rendezvous_id)} HTTP/1.1" 200 5'
    assert any(expected in line for line in lines), lines
    assert not any(rendezvous_id in line or "SECRET" in line for line in lines)


def test_json_errors_are_small_and_well_formed(harness: Harness) -> None:
    """Error bodies are JSON objects with exactly errcode and error."""
    answer = harness.call("GET", "/AAAAAAAAAAAAAAAAAAAAAA")
    assert set(json.loads(answer.body)) == {"errcode", "error"}


# The request and channel: limits enforced as bytes arrive, and JSON even for
# requests that never reach a resource.  Driven byte by byte over a
# StringTransport; the same is proven over real sockets end to end.


def connect(**config: Any) -> tuple[Harness, Any, StringTransport]:
    harness = Harness(**config)
    site = harness.site(MemoryReactorClock())
    channel = site.buildProtocol(IPv4Address("TCP", "192.0.2.9", 4321))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.9", 4321))
    channel.makeConnection(transport)
    return harness, channel, transport


def raw_answer(transport: StringTransport) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        headers[name.lower()] = value
    return status, headers, body


def test_oversize_content_length_is_refused_before_the_body() -> None:
    """A Content-Length over max_bytes gets a JSON 413 at once, and the connection closes."""
    harness, channel, transport = connect(max_bytes=100)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, headers, body = raw_answer(transport)
    assert status == b"HTTP/1.1 413 Content Too Large"
    assert json.loads(body)["errcode"] == "M_TOO_LARGE"
    assert headers[b"content-length"] == b"%d" % len(body)
    assert headers[b"connection"] == b"close"
    for name, value in EVERY_RESPONSE:
        assert headers[name.lower()] == value
    assert transport.disconnecting
    # The body, should it come anyway, is never parsed or stored.
    channel.dataReceived(b"x" * 101)
    assert harness.store.rendezvous_count == 0


def test_oversize_content_length_never_invites_the_body() -> None:
    """An oversize request with Expect: 100-continue gets 413, never 100 Continue."""
    _, channel, transport = connect(max_bytes=100)
    channel.dataReceived(
        b"PUT /AAAAAAAAAAAAAAAAAAAAAA HTTP/1.1\r\nHost: x\r\n"
        b"Expect: 100-continue\r\nContent-Length: 5000000\r\n\r\n"
    )
    assert b"100 Continue" not in transport.value()
    assert transport.value().startswith(b"HTTP/1.1 413 ")


def test_chunked_body_is_cut_off_as_it_passes_the_limit() -> None:
    """A chunked body is refused with 413 the moment it passes max_bytes."""
    harness, channel, transport = connect(max_bytes=100)
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(b"64\r\n" + b"a" * 100 + b"\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"1\r\nb\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting
    channel.dataReceived(b"0\r\n\r\n")
    assert harness.store.rendezvous_count == 0


def test_chunked_body_within_the_limit_is_accepted() -> None:
    """A chunked body of exactly max_bytes creates a rendezvous holding those bytes."""
    harness, channel, transport = connect(max_bytes=100)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"32\r\n" + b"a" * 50 + b"\r\n32\r\n" + b"b" * 50 + b"\r\n0\r\n\r\n"
    )
    status, _, body = raw_answer(transport)
    assert status == b"HTTP/1.1 200 OK"
    rendezvous_id = json.loads(body)["id"]
    assert fired(harness.store.read(rendezvous_id)).body == b"a" * 50 + b"b" * 50


def test_bodies_are_never_spooled_to_disk() -> None:
    """A body of unknown length is buffered in memory, never in a temporary file."""
    _, channel, _ = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert isinstance(channel.http11.requests[-1].content, BytesIO)


def test_answers_are_framed_by_content_length_never_chunked() -> None:
    """A 200 carries Content-Length and no Transfer-Encoding, on HTTP/1.1."""
    _, channel, transport = connect()
    channel.dataReceived(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    status, headers, body = raw_answer(transport)
    assert status == b"HTTP/1.1 200 OK"
    assert b"transfer-encoding" not in headers
    assert headers[b"content-length"] == b"%d" % len(body)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"NOT A REQUEST LINE\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    ],
)
def test_unparseable_requests_get_a_json_400(request_bytes: bytes) -> None:
    """A request Twisted cannot parse is answered with a JSON 400 and the connection closes."""
    _, channel, transport = connect()
    channel.dataReceived(request_bytes)
    status, headers, body = raw_answer(transport)
    assert status == b"HTTP/1.1 400 Bad Request"
    assert json.loads(body)["errcode"] == "M_BAD_REQUEST"
    assert headers[b"access-control-allow-origin"] == b"*"
    assert transport.disconnecting


def test_a_connection_accepted_once_the_drain_began_is_closed_unanswered() -> None:
    """A connection accepted as the listeners stopped is closed, not kept till the deadline."""
    harness = Harness()
    clock = MemoryReactorClock()
    site = harness.site(clock)
    peer = IPv4Address("TCP", "192.0.2.9", 4321)
    assert site.buildProtocol(peer) is not None
    site.drain(clock, 5)
    assert site.buildProtocol(peer) is None
