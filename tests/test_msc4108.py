"""
The MSC4108 session protocol ("insecure rendezvous session", the 2024
revision that Synapse and today's Element clients speak), one rule at a time
from the proposal's text and SPEC.md's appendix, against the real Klein
resource in memory (StubTreq), with time on a Clock.
"""

from __future__ import annotations

import json

import pytest

from rendezvous_twisted.core.config import MSC4108_DEFAULT_SESSION_PREFIX, Config
from rendezvous_twisted.protocols.msc4108 import STABLE_CREATE_PATH, UNSTABLE_CREATE_PATH

from .conftest import BASE, EPOCH, Answer, Harness, answered, fired
from .test_web import (
    assert_every_response_headers,
    assert_json_error,
    assert_rendezvous_headers,
)

CREATE = UNSTABLE_CREATE_PATH
TEXT = {"Content-Type": "text/plain"}


def create(
    harness: Harness, body: bytes = b"hello from A", path: str = CREATE
) -> tuple[str, Answer]:
    """
    Create a session; return its path on this server, and the answer.
    """
    answer = harness.call("POST", path, body, headers=TEXT)
    assert answer.code == 201, answer
    url: str = answer.json()["url"]
    assert url.startswith(BASE)
    return url[len(BASE) :], answer


def etag(answer: Answer) -> bytes:
    value = answer.header("etag")
    assert value is not None
    return value


def assert_msc4108_headers(answer: Answer) -> None:
    """
    The common headers the proposal requires on every session answer.
    """
    assert answer.header("etag") is not None, answer
    assert answer.header("expires") is not None, answer
    assert answer.header("last-modified") is not None, answer
    cache_control = answer.header("cache-control")
    assert cache_control is not None
    assert "no-store" in [d.strip() for d in cache_control.decode().split(",")]
    assert answer.header("pragma") == b"no-cache"
    assert_every_response_headers(answer)


# Create.


@pytest.mark.parametrize("path", [UNSTABLE_CREATE_PATH, STABLE_CREATE_PATH])
def test_create_answers_201_with_the_absolute_session_url(harness: Harness, path: str) -> None:
    """POST to either create path answers 201, application/json {"url": absolute URL}."""
    answer = harness.call("POST", path, b"hello", headers=TEXT)
    assert answer.code == 201
    assert answer.header("content-type") == b"application/json"
    document = answer.json()
    assert set(document) == {"url"}
    url = document["url"]
    assert url.startswith(BASE + MSC4108_DEFAULT_SESSION_PREFIX)
    assert len(url) >= len(BASE + MSC4108_DEFAULT_SESSION_PREFIX) + 22
    assert answer.header("location") is None
    assert_msc4108_headers(answer)
    assert_rendezvous_headers(answer, etag(answer), EPOCH + 60, EPOCH)


def test_session_url_follows_the_public_url_and_the_configured_prefix() -> None:
    """The session URL is the public URL, then the configured prefix, then the id."""
    harness = Harness(public_url="https://rz.example.org/base/", msc4108_session_prefix="/s/")
    answer = harness.call("POST", CREATE, b"x", headers=TEXT)
    url = answer.json()["url"]
    assert url.startswith("https://rz.example.org/base/s/")
    session = "/s/" + url.rsplit("/", 1)[1]
    read = harness.call("GET", session)
    assert (read.code, read.body) == (200, b"x")
    # The default prefix serves nothing once another is configured.
    default = MSC4108_DEFAULT_SESSION_PREFIX + url.rsplit("/", 1)[1]
    assert_json_error(harness.call("GET", default), 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize("prefix", ["/", "s/", "/s", "//s/", "/s//t/", "/s t/", "/%2F/"])
def test_an_unusable_session_prefix_is_refused(prefix: str) -> None:
    """A session prefix that is not a path of segments with a slash at each end is refused."""
    with pytest.raises(ValueError, match="msc4108_session_prefix"):
        Config(msc4108_session_prefix=prefix)


def test_create_without_content_type_is_missing_param(harness: Harness) -> None:
    """A create without Content-Type is 400 M_MISSING_PARAM."""
    assert_json_error(harness.call("POST", CREATE, b"x"), 400, "M_MISSING_PARAM")


@pytest.mark.parametrize(
    "content_type",
    [b"application/json", b"application/octet-stream", b"text/plainx", b"text/html", b"text"],
)
def test_create_with_another_content_type_is_invalid_param(
    harness: Harness, content_type: bytes
) -> None:
    """A create whose Content-Type is not text/plain is 400 M_INVALID_PARAM."""
    answer = harness.call("POST", CREATE, b"x", headers={"Content-Type": content_type})
    assert_json_error(answer, 400, "M_INVALID_PARAM")


def test_create_with_two_content_types_is_invalid_param(harness: Harness) -> None:
    """Two Content-Type headers are 400 M_INVALID_PARAM, even if one is text/plain."""
    answer = harness.call(
        "POST", CREATE, b"x", headers={"Content-Type": ["text/plain", "text/plain"]}
    )
    assert_json_error(answer, 400, "M_INVALID_PARAM")


@pytest.mark.parametrize("content_type", ["text/plain;charset=UTF-8", "TEXT/Plain", "text/plain "])
def test_text_plain_with_parameters_or_other_case_is_accepted(
    harness: Harness, content_type: str
) -> None:
    """text/plain in any case, with parameters (a browser's charset), is accepted, stored plain."""
    answer = harness.call("POST", CREATE, b"x", headers={"Content-Type": content_type})
    assert answer.code == 201
    path = answer.json()["url"][len(BASE) :]
    assert harness.call("GET", path).header("content-type") == b"text/plain"


def test_create_limit_is_4_kib(harness: Harness) -> None:
    """A payload of 4096 bytes is accepted; 4097 is 413 M_TOO_LARGE."""
    assert harness.call("POST", CREATE, b"x" * 4096, headers=TEXT).code == 201
    assert_json_error(harness.call("POST", CREATE, b"x" * 4097, headers=TEXT), 413, "M_TOO_LARGE")


def test_a_smaller_max_bytes_caps_the_msc4108_limit() -> None:
    """A server configured below 4 KiB refuses MSC4108 payloads over its own limit."""
    harness = Harness(max_bytes=100)
    assert harness.call("POST", CREATE, b"x" * 100, headers=TEXT).code == 201
    assert_json_error(harness.call("POST", CREATE, b"x" * 101, headers=TEXT), 413, "M_TOO_LARGE")


def test_other_methods_on_create_are_405(harness: Harness) -> None:
    """GET, PUT or DELETE on a create path is a JSON 405 with Allow."""
    for method in ("GET", "PUT", "DELETE"):
        answer = harness.call(method, CREATE)
        assert_json_error(answer, 405, "M_UNRECOGNIZED")
        assert answer.header("allow") == b"POST, OPTIONS"


def test_sessions_share_the_servers_caps() -> None:
    """Sessions count against the same caps as native rendezvous: a full server is 429."""
    harness = Harness(max_rendezvous=2, max_rendezvous_per_address=2)
    create(harness)
    harness.create()
    full = harness.call("POST", CREATE, b"x", headers=TEXT)
    assert_json_error(full, 429, "M_LIMIT_EXCEEDED")
    assert full.header("retry-after") is not None


# Receive: GET.


def test_get_answers_the_payload_as_text_plain(harness: Harness) -> None:
    """GET answers 200 with the payload, Content-Type exactly text/plain, and the common headers."""
    path, created = create(harness, b"hello from A")
    answer = harness.call("GET", path)
    assert (answer.code, answer.body) == (200, b"hello from A")
    assert answer.header("content-type") == b"text/plain"
    assert_msc4108_headers(answer)
    assert_rendezvous_headers(answer, etag(created), EPOCH + 60, EPOCH)


def test_matching_if_none_match_long_polls_then_304_with_every_header() -> None:
    """A matching If-None-Match is held for the poll timeout, then 304 with the common headers."""
    harness = Harness(poll_timeout_seconds=20)
    path, created = create(harness)
    d = harness.send("GET", path, headers={"If-None-Match": etag(created)})
    harness.advance(19.9)
    assert not answered(d)
    harness.advance(0.1)
    answer: Answer = fired(d)
    assert answer.code == 304
    assert answer.body == b""
    assert_msc4108_headers(answer)
    assert_rendezvous_headers(answer, etag(created), EPOCH + 60, EPOCH)


def test_prefer_wait_0_answers_304_at_once(harness: Harness) -> None:
    """With Prefer: wait=0 a matching If-None-Match is answered 304 at once, as clients poll."""
    path, created = create(harness)
    answer = harness.call("GET", path, headers={"If-None-Match": etag(created), "Prefer": "wait=0"})
    assert answer.code == 304
    assert_msc4108_headers(answer)


def test_a_parked_get_is_woken_by_a_put(harness: Harness) -> None:
    """A parked GET is answered 200 text/plain with the new payload the moment a PUT lands."""
    path, created = create(harness)
    d = harness.send("GET", path, headers={"If-None-Match": etag(created)})
    harness.advance(5)
    assert not answered(d)
    put = harness.call("PUT", path, b"hello from B", headers={**TEXT, "If-Match": etag(created)})
    assert put.code == 202
    harness.flush()
    answer: Answer = fired(d)
    assert (answer.code, answer.body) == (200, b"hello from B")
    assert answer.header("content-type") == b"text/plain"
    assert answer.header("etag") == etag(put)


def test_non_matching_if_none_match_answers_at_once(harness: Harness) -> None:
    """An If-None-Match of another ETag is answered 200 at once."""
    path, _ = create(harness)
    answer = harness.call("GET", path, headers={"If-None-Match": '"other"'})
    assert answer.code == 200


def test_a_browser_navigation_to_a_session_is_refused(harness: Harness) -> None:
    """Opening a session URL as a page is 403, as for native rendezvous."""
    path, _ = create(harness)
    answer = harness.call("GET", path, headers={"Sec-Fetch-Mode": "navigate"})
    assert_json_error(answer, 403, "M_FORBIDDEN")


# Send: PUT.


def test_put_with_the_current_etag_answers_202_with_new_headers(harness: Harness) -> None:
    """PUT with If-Match on the current ETag answers 202 with the new ETag and common headers."""
    path, created = create(harness)
    harness.advance(3)
    answer = harness.call("PUT", path, b"hello from B", headers={**TEXT, "If-Match": etag(created)})
    assert answer.code == 202
    assert answer.body == b""
    assert_msc4108_headers(answer)
    assert etag(answer) != etag(created)
    # Expiry is fixed at creation; Last-Modified is the write's.
    assert_rendezvous_headers(answer, etag(answer), EPOCH + 60, EPOCH + 3)
    read = harness.call("GET", path)
    assert (read.body, etag(read)) == (b"hello from B", etag(answer))


def test_identical_payloads_get_new_etags(harness: Harness) -> None:
    """Writing the same bytes again yields a new ETag, so each side tells the writes apart."""
    path, created = create(harness, b"same")
    first = harness.call("PUT", path, b"same", headers={**TEXT, "If-Match": etag(created)})
    second = harness.call("PUT", path, b"same", headers={**TEXT, "If-Match": etag(first)})
    assert len({etag(created), etag(first), etag(second)}) == 3


def test_put_without_if_match_is_missing_param(harness: Harness) -> None:
    """PUT without If-Match is 400 M_MISSING_PARAM, and the payload is unchanged."""
    path, _ = create(harness, b"kept")
    assert_json_error(harness.call("PUT", path, b"x", headers=TEXT), 400, "M_MISSING_PARAM")
    assert harness.call("GET", path).body == b"kept"


@pytest.mark.parametrize("if_match", ["*", 'W/"x"', '"a", "b"', "garbage", '"unterminated'])
def test_put_with_anything_but_one_strong_etag_is_invalid_param(
    harness: Harness, if_match: str
) -> None:
    """An If-Match that is not exactly one strong ETag is 400 M_INVALID_PARAM."""
    path, _ = create(harness, b"kept")
    answer = harness.call("PUT", path, b"x", headers={**TEXT, "If-Match": if_match})
    assert_json_error(answer, 400, "M_INVALID_PARAM")
    assert harness.call("GET", path).body == b"kept"


def test_put_with_a_stale_etag_is_412_concurrent_write(harness: Harness) -> None:
    """A stale If-Match is 412, M_UNKNOWN with the unstable M_CONCURRENT_WRITE, and headers."""
    path, created = create(harness)
    fresh = harness.call("PUT", path, b"B", headers={**TEXT, "If-Match": etag(created)})
    answer = harness.call("PUT", path, b"late", headers={**TEXT, "If-Match": etag(created)})
    assert_json_error(answer, 412, "M_UNKNOWN")
    assert answer.json()["org.matrix.msc4108.errcode"] == "M_CONCURRENT_WRITE"
    assert_msc4108_headers(answer)
    assert etag(answer) == etag(fresh)
    assert harness.call("GET", path).body == b"B"


def test_put_content_type_rules(harness: Harness) -> None:
    """PUT without Content-Type is M_MISSING_PARAM, with another type M_INVALID_PARAM."""
    path, created = create(harness)
    missing = harness.call("PUT", path, b"x", headers={"If-Match": etag(created)})
    assert_json_error(missing, 400, "M_MISSING_PARAM")
    other = harness.call(
        "PUT", path, b"x", headers={"Content-Type": "application/json", "If-Match": etag(created)}
    )
    assert_json_error(other, 400, "M_INVALID_PARAM")


def test_put_limit_is_4_kib(harness: Harness) -> None:
    """A PUT of 4096 bytes is accepted; 4097 is 413 M_TOO_LARGE and changes nothing."""
    path, created = create(harness)
    ok = harness.call("PUT", path, b"y" * 4096, headers={**TEXT, "If-Match": etag(created)})
    assert ok.code == 202
    big = harness.call("PUT", path, b"z" * 4097, headers={**TEXT, "If-Match": etag(ok)})
    assert_json_error(big, 413, "M_TOO_LARGE")
    assert harness.call("GET", path).body == b"y" * 4096


# Cancel, expiry, unknown sessions.


def test_delete_answers_204_then_everything_is_404(harness: Harness) -> None:
    """DELETE answers 204; the session is then 404 M_NOT_FOUND to GET, PUT and DELETE."""
    path, created = create(harness)
    parked = harness.send("GET", path, headers={"If-None-Match": etag(created)})
    deleted = harness.call("DELETE", path)
    assert deleted.code == 204
    harness.flush()
    assert_json_error(fired(parked), 404, "M_NOT_FOUND")
    assert_json_error(harness.call("GET", path), 404, "M_NOT_FOUND")
    put = harness.call("PUT", path, b"x", headers={**TEXT, "If-Match": etag(created)})
    assert_json_error(put, 404, "M_NOT_FOUND")
    assert_json_error(harness.call("DELETE", path), 404, "M_NOT_FOUND")


def test_expiry_is_fixed_at_creation() -> None:
    """A session expires TTL after creation, writes notwithstanding: then 404."""
    harness = Harness(ttl_seconds=60)
    path, created = create(harness)
    harness.advance(30)
    put = harness.call("PUT", path, b"B", headers={**TEXT, "If-Match": etag(created)})
    assert put.header("expires") == created.header("expires")
    harness.advance(29.9)
    assert harness.call("GET", path).code == 200
    harness.advance(0.1)
    assert_json_error(harness.call("GET", path), 404, "M_NOT_FOUND")


@pytest.mark.parametrize(
    "suffix", ["AAAAAAAAAAAAAAAAAAAAAA", "short", "has.dot.in.it.and.is.long", "%00" * 20]
)
def test_unknown_or_malformed_session_ids_are_404(harness: Harness, suffix: str) -> None:
    """A session path with an unknown or malformed id is 404 M_NOT_FOUND."""
    answer = harness.call("GET", MSC4108_DEFAULT_SESSION_PREFIX + suffix)
    assert_json_error(answer, 404, "M_NOT_FOUND")


def test_paths_below_a_session_are_unknown(harness: Harness) -> None:
    """A path below a session URL names nothing: 404 M_UNRECOGNIZED."""
    path, _ = create(harness)
    assert_json_error(harness.call("GET", path + "/more"), 404, "M_UNRECOGNIZED")


def test_post_on_a_session_is_405(harness: Harness) -> None:
    """POST on a session URL is a JSON 405 with Allow."""
    path, _ = create(harness)
    answer = harness.call("POST", path, b"x", headers=TEXT)
    assert_json_error(answer, 405, "M_UNRECOGNIZED")
    assert answer.header("allow") == b"GET, PUT, DELETE, OPTIONS"


# CORS.


def test_preflights_allow_what_msc4108_clients_send(harness: Harness) -> None:
    """OPTIONS on create and session paths allows any origin and what MSC4108 clients send."""
    path, _ = create(harness)
    for target in (CREATE, STABLE_CREATE_PATH, path):
        answer = harness.call(
            "OPTIONS",
            target,
            headers={
                "Origin": "https://app.element.io",
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-type,if-match",
            },
        )
        assert answer.code == 204
        assert answer.header("access-control-allow-origin") == b"*"
        methods = {m.strip() for m in answer.header("access-control-allow-methods").split(b",")}  # type: ignore[union-attr]
        assert {b"GET", b"PUT", b"DELETE", b"POST"} <= methods
        allowed = {
            h.strip().lower()
            for h in answer.header("access-control-allow-headers").split(b",")  # type: ignore[union-attr]
        }
        assert {b"if-match", b"if-none-match", b"content-type"} <= allowed
        exposed = {
            h.strip().lower()
            for h in answer.header("access-control-expose-headers").split(b",")  # type: ignore[union-attr]
        }
        assert b"etag" in exposed


def test_every_session_answer_exposes_etag_to_any_origin(harness: Harness) -> None:
    """Every MSC4108 answer, errors included, has Allow-Origin * and exposes ETag."""
    path, _ = create(harness)
    answers = [
        harness.call("POST", CREATE, b"x", headers=TEXT),
        harness.call("POST", CREATE, b"x"),
        harness.call("GET", path),
        harness.call("PUT", path, b"x", headers={**TEXT, "If-Match": '"stale"'}),
        harness.call("PUT", path, b"x", headers=TEXT),
        harness.call("DELETE", path),
        harness.call("GET", path),
    ]
    for answer in answers:
        assert answer.header("access-control-allow-origin") == b"*", answer
        assert b"ETag" in (answer.header("access-control-expose-headers") or b""), answer


# One store, two faces.


def test_an_msc4108_get_labels_any_payload_text_plain(harness: Harness) -> None:
    """A session written through the native URL is still answered text/plain on the MSC4108 URL."""
    path, _ = create(harness)
    session_id = path.rsplit("/", 1)[1]
    native = harness.call(
        "PUT", f"/{session_id}", b"{}", headers={"Content-Type": "application/json"}
    )
    assert native.code == 202
    answer = harness.call("GET", path)
    assert (answer.body, answer.header("content-type")) == (b"{}", b"text/plain")
    assert json.loads(harness.call("GET", f"/{session_id}").body) == {}
