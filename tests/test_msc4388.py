"""
MSC4388's rendezvous sessions, one rule at a time from the proposal's text
(matrix-org/matrix-spec-proposals, proposals/4388-secure-qr-channel.md) and
SPEC.md's appendix, against the real Klein resource in memory (StubTreq),
with time on a Clock.  Whole exchanges over real sockets, on both stores,
are tests/test_msc4388_end_to_end.py's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed

from rendezvous_twisted.core.config import MSC4388_STABLE_PATH, MSC4388_UNSTABLE_PATH, Config
from rendezvous_twisted.http.tokens import HomeserverUnavailableError, InvalidTokenError

from .conftest import Answer, Harness, answered, fired
from .test_web import assert_every_response_headers, assert_json_error, assert_wrong_method

UNSTABLE = MSC4388_UNSTABLE_PATH
STABLE = MSC4388_STABLE_PATH
PREFIXES = [UNSTABLE, STABLE]
JSON_TYPE = {"Content-Type": "application/json"}
#: The opaque identifier grammar of the Matrix spec.
OPAQUE = re.compile(r"[0-9A-Za-z._~-]{1,255}\Z")
LIFETIME = 300.0


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode("utf-8")


def create(harness: Harness, data: str = "hello from A", prefix: str = UNSTABLE) -> dict[str, Any]:
    answer = harness.call("POST", prefix, body(data=data), headers=JSON_TYPE)
    assert answer.code == 200, answer
    created: dict[str, Any] = answer.json()
    return created


def read(harness: Harness, session_id: str, prefix: str = UNSTABLE, **kw: Any) -> Answer:
    return harness.call("GET", f"{prefix}/{session_id}", **kw)


def send(
    harness: Harness,
    session_id: str,
    token: str,
    data: str,
    txn: str | None = "txn1",
    prefix: str = UNSTABLE,
) -> Answer:
    path = f"{prefix}/{session_id}" + ("" if txn is None else f"/{txn}")
    return harness.call("PUT", path, body(sequence_token=token, data=data), headers=JSON_TYPE)


class Verdicts:
    """
    A create policy that answers as told, and records what it was shown.
    """

    def __init__(self, verdict: bool | Exception) -> None:
        self.verdict = verdict
        self.shown: list[Sequence[bytes] | None] = []

    def may_create(self, authorization: Sequence[bytes] | None) -> Deferred[bool]:
        self.shown.append(authorization)
        if isinstance(self.verdict, Exception):
            return fail(self.verdict)
        return succeed(self.verdict)


# Discovery.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_discovery_says_create_is_available(harness: Harness, prefix: str) -> None:
    """GET on the API answers 200 {"create_available": true} as JSON, with the common headers."""
    answer = harness.call("GET", prefix)
    assert answer.code == 200
    assert answer.json() == {"create_available": True}
    assert answer.header("content-type") == b"application/json"
    assert_every_response_headers(answer)


def test_discovery_follows_the_create_policy_and_sees_the_token() -> None:
    """A requester the policy refuses is told create_available: false, not an error."""
    policy = Verdicts(False)
    harness = Harness(policy=policy)
    answer = harness.call("GET", UNSTABLE, headers={"Authorization": "Bearer abc"})
    assert (answer.code, answer.json()) == (200, {"create_available": False})
    assert policy.shown == [[b"Bearer abc"]]


def test_discovery_follows_the_network_create_policy() -> None:
    """A client outside --allow-create is told create_available: false."""
    harness = Harness(allow_create=["10.0.0.0/8"])
    assert harness.call("GET", UNSTABLE).json() == {"create_available": False}


def test_discovery_with_an_invalid_token_is_401(harness: Harness) -> None:
    """An invalid access token is 401 M_UNKNOWN_TOKEN, never treated as no token."""
    harness = Harness(policy=Verdicts(InvalidTokenError("unknown token")))
    assert_json_error(harness.call("GET", UNSTABLE), 401, "M_UNKNOWN_TOKEN")


# Create.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_create_answers_id_sequence_token_and_expiry(harness: Harness, prefix: str) -> None:
    """POST {"data"} is 200 with an opaque id and token, and expires_in_ms of the lifetime."""
    answer = harness.call("POST", prefix, body(data="hello"), headers=JSON_TYPE)
    assert answer.code == 200
    assert answer.header("content-type") == b"application/json"
    assert answer.header("location") is None
    created = answer.json()
    assert set(created) == {"id", "sequence_token", "expires_in_ms"}
    assert OPAQUE.match(created["id"]) and OPAQUE.match(created["sequence_token"])
    assert created["expires_in_ms"] == LIFETIME * 1000
    assert_every_response_headers(answer)


def test_empty_data_creates(harness: Harness) -> None:
    """The generating device creates with empty data (the proposal's step 2)."""
    created = create(harness, "")
    assert read(harness, created["id"]).json()["data"] == ""


def test_the_lifetime_is_its_own_option_whatever_ttl_says() -> None:
    """MSC4388 sessions live --msc4388-lifetime, however short --ttl is."""
    harness = Harness(ttl_seconds=30, msc4388_lifetime_seconds=120)
    created = create(harness)
    assert created["expires_in_ms"] == 120_000
    harness.advance(119.9)
    assert read(harness, created["id"]).code == 200
    harness.advance(0.1)
    assert_json_error(read(harness, created["id"]), 404, "M_NOT_FOUND")


@pytest.mark.parametrize(
    ("raw", "errcode"),
    [
        (b"not json", "M_NOT_JSON"),
        (b'{"data": NaN}', "M_NOT_JSON"),
        (b"[" * 5000 + b"]" * 5000, "M_NOT_JSON"),
        (b'["data"]', "M_BAD_JSON"),
        (b"{}", "M_MISSING_PARAM"),
        (b'{"data": 5}', "M_INVALID_PARAM"),
        (b'{"data": null}', "M_INVALID_PARAM"),
        (b'{"data": "\\ud800"}', "M_INVALID_PARAM"),
    ],
)
def test_create_bodies_that_are_not_a_data_string_are_400(
    harness: Harness, raw: bytes, errcode: str
) -> None:
    """A body that is not JSON, not an object, or has no string data is a 400 naming why."""
    answer = harness.call("POST", UNSTABLE, raw, headers=JSON_TYPE)
    assert_json_error(answer, 400, errcode)
    assert harness.store.rendezvous_count == 0


def test_data_is_limited_to_4096_bytes_of_utf8(harness: Harness) -> None:
    """4096 bytes of data are accepted; one more is 413 M_TOO_LARGE (counted in UTF-8 bytes)."""
    assert create(harness, "x" * 4096)
    answer = harness.call("POST", UNSTABLE, body(data="é" * 2049), headers=JSON_TYPE)
    assert_json_error(answer, 413, "M_TOO_LARGE")


def test_a_smaller_max_bytes_caps_the_data_limit() -> None:
    harness = Harness(max_bytes=100)
    answer = harness.call("POST", UNSTABLE, body(data="x" * 101), headers=JSON_TYPE)
    assert_json_error(answer, 413, "M_TOO_LARGE")


def test_create_policy_refusal_is_403_and_creates_nothing() -> None:
    """A requester the policy refuses gets 403 M_FORBIDDEN on create."""
    harness = Harness(policy=Verdicts(False))
    answer = harness.call("POST", UNSTABLE, body(data="x"), headers=JSON_TYPE)
    assert_json_error(answer, 403, "M_FORBIDDEN")
    assert harness.store.rendezvous_count == 0


@pytest.mark.parametrize(
    ("error", "code", "errcode"),
    [
        (InvalidTokenError("expired"), 401, "M_UNKNOWN_TOKEN"),
        (HomeserverUnavailableError(), 503, "M_UNKNOWN"),
    ],
)
def test_create_policy_failures_are_answered(error: Exception, code: int, errcode: str) -> None:
    """An invalid token is 401 and a homeserver that cannot judge it 503: never an open door."""
    policy = Verdicts(error)
    harness = Harness(policy=policy)
    headers = {**JSON_TYPE, "Authorization": "Bearer xyz"}
    answer = harness.call("POST", UNSTABLE, body(data="x"), headers=headers)
    assert_json_error(answer, code, errcode)
    assert policy.shown == [[b"Bearer xyz"]]
    assert harness.store.rendezvous_count == 0


@pytest.mark.parametrize(
    "limits",
    [
        {"create_burst": 2, "create_per_second": 0.001},
        {"max_rendezvous_per_address": 2, "create_burst": 10},
    ],
)
def test_creates_share_the_older_protocols_limits(limits: dict[str, Any]) -> None:
    """
    MSC4388 creates count against the same per-client create budget and
    --max-rendezvous-per-address as the others': past either, 429 with
    Retry-After.
    """
    harness = Harness(**limits)
    harness.create()
    create(harness)
    answer = harness.call("POST", UNSTABLE, body(data="x"), headers=JSON_TYPE)
    assert_json_error(answer, 429, "M_LIMIT_EXCEEDED")
    assert answer.header("retry-after") is not None


# The stable path, shared with MSC4108.


def test_the_stable_path_tells_msc4388_from_msc4108_by_content_type(harness: Harness) -> None:
    """A JSON POST on the stable path is MSC4388's create, a text/plain one MSC4108's."""
    msc4388 = harness.call("POST", STABLE, body(data="x"), headers=JSON_TYPE)
    assert msc4388.code == 200 and "sequence_token" in msc4388.json()
    typed = {"Content-Type": "Application/JSON; charset=utf-8"}
    assert harness.call("POST", STABLE, body(data="x"), headers=typed).code == 200
    msc4108 = harness.call("POST", STABLE, b"hi", headers={"Content-Type": "text/plain"})
    assert msc4108.code == 201 and "url" in msc4108.json()
    untyped = harness.call("POST", STABLE, b"hi")
    assert_json_error(untyped, 400, "M_MISSING_PARAM")


# Read.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_read_answers_data_token_and_remaining_time(harness: Harness, prefix: str) -> None:
    created = create(harness, "hello from A", prefix)
    harness.advance(10.5)
    answer = read(harness, created["id"], prefix)
    assert answer.code == 200
    assert answer.header("content-type") == b"application/json"
    assert answer.json() == {
        "data": "hello from A",
        "sequence_token": created["sequence_token"],
        "expires_in_ms": 289_500,
    }
    assert_every_response_headers(answer)


def test_data_round_trips_any_unicode(harness: Harness) -> None:
    data = 'ünïcödé \u2603 \U0001f600 "quoted" \\ \n\x00'
    created = create(harness, data)
    assert read(harness, created["id"]).json()["data"] == data


def test_a_browser_navigation_to_a_session_is_refused(harness: Harness) -> None:
    """Top-level navigations are 403 M_FORBIDDEN (the proposal's unsafe-content rule)."""
    created = create(harness)
    for headers in ({"Sec-Fetch-Mode": "navigate"}, {"Sec-Fetch-Dest": "document"}):
        assert_json_error(read(harness, created["id"], headers=headers), 403, "M_FORBIDDEN")


def test_another_protocols_rendezvous_is_not_found_here(harness: Harness) -> None:
    """MSC4388's paths serve only MSC4388 sessions."""
    native, _ = harness.create(b"\xff\xfe not text")
    assert_json_error(read(harness, native), 404, "M_NOT_FOUND")


@pytest.mark.parametrize("session_id", ["unknown-id-0123456789", "short", "bad%20id"])
def test_unknown_ids_are_404_not_found(harness: Harness, session_id: str) -> None:
    assert_json_error(read(harness, session_id), 404, "M_NOT_FOUND")
    answer = send(harness, session_id, "token", "data")
    assert_json_error(answer, 404, "M_NOT_FOUND")
    assert_json_error(harness.call("DELETE", f"{UNSTABLE}/{session_id}"), 404, "M_NOT_FOUND")


# Long-polling by ?sequence_token= (the proposal's "future optimisation").


def held_read(harness: Harness) -> tuple[dict[str, Any], Deferred[Answer]]:
    """
    Create a session, and start a read naming its current token (held).
    """
    created = create(harness)
    path = f"{UNSTABLE}/{created['id']}?sequence_token={created['sequence_token']}"
    return created, harness.send("GET", path)


def test_a_read_naming_the_current_token_is_held_until_a_send() -> None:
    harness = Harness(poll_timeout_seconds=20)
    created, d = held_read(harness)
    token = created["sequence_token"]
    harness.advance(5)
    assert not answered(d)
    sent = send(harness, created["id"], token, "hello from B")
    assert sent.code == 200
    harness.flush()
    answer: Answer = fired(d)
    assert answer.code == 200
    assert answer.json()["data"] == "hello from B"
    assert answer.json()["sequence_token"] == sent.json()["sequence_token"]


def test_a_held_read_answers_the_same_state_at_the_poll_timeout() -> None:
    harness = Harness(poll_timeout_seconds=20)
    created, d = held_read(harness)
    token = created["sequence_token"]
    harness.advance(19.9)
    assert not answered(d)
    harness.advance(0.1)
    answer: Answer = fired(d)
    assert answer.code == 200
    assert answer.json() == {
        "data": "hello from A",
        "sequence_token": token,
        "expires_in_ms": 280_000,
    }


def test_a_read_naming_an_older_token_answers_at_once(harness: Harness) -> None:
    created = create(harness)
    answer = harness.call("GET", f"{UNSTABLE}/{created['id']}?sequence_token=older")
    assert answer.json()["sequence_token"] == created["sequence_token"]


def test_a_held_read_ends_with_404_on_delete() -> None:
    harness = Harness(poll_timeout_seconds=20)
    created, d = held_read(harness)
    assert harness.call("DELETE", f"{UNSTABLE}/{created['id']}").code == 200
    harness.flush()
    assert_json_error(fired(d), 404, "M_NOT_FOUND")


def test_prefer_wait_shortens_the_hold(harness: Harness) -> None:
    created = create(harness)
    path = f"{UNSTABLE}/{created['id']}?sequence_token={created['sequence_token']}"
    assert harness.call("GET", path, headers={"Prefer": "wait=0"}).code == 200


def test_the_token_parameter_may_be_given_once(harness: Harness) -> None:
    created = create(harness)
    path = f"{UNSTABLE}/{created['id']}?sequence_token=a&sequence_token=b"
    assert_json_error(harness.call("GET", path), 400, "M_INVALID_PARAM")


def test_two_devices_behind_one_address_poll_through_a_whole_login() -> None:
    """
    With the default budgets, two devices sharing one address and polling
    once a second (as clients without long-polling do) get through a whole
    session lifetime without a 429.
    """
    harness = Harness()
    created = create(harness)
    session = created["id"]
    token = created["sequence_token"]
    for second in range(int(LIFETIME) - 1):
        for _device in range(2):
            assert read(harness, session).code == 200
        if second % 30 == 0:
            answer = send(harness, session, token, f"message {second}", f"txn{second}")
            assert answer.code == 200, answer
            token = answer.json()["sequence_token"]
        harness.advance(1)


# Send.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_send_with_the_current_token_answers_a_new_token(harness: Harness, prefix: str) -> None:
    created = create(harness, prefix=prefix)
    answer = send(harness, created["id"], created["sequence_token"], "hello from B", prefix=prefix)
    assert answer.code == 200
    assert answer.header("content-type") == b"application/json"
    assert set(answer.json()) == {"sequence_token"}
    token = answer.json()["sequence_token"]
    assert OPAQUE.match(token) and token != created["sequence_token"]
    assert read(harness, created["id"], prefix).json()["data"] == "hello from B"
    assert_every_response_headers(answer)


def test_identical_data_gets_a_new_token(harness: Harness) -> None:
    created = create(harness, "same")
    answer = send(harness, created["id"], created["sequence_token"], "same")
    assert answer.json()["sequence_token"] != created["sequence_token"]


@pytest.mark.parametrize(
    ("prefix", "errcode"),
    [(UNSTABLE, "IO_ELEMENT_MSC4388_CONCURRENT_WRITE"), (STABLE, "M_CONCURRENT_WRITE")],
)
def test_a_stale_token_is_409_concurrent_write(harness: Harness, prefix: str, errcode: str) -> None:
    created = create(harness, prefix=prefix)
    first = send(harness, created["id"], created["sequence_token"], "one", "t1", prefix)
    assert first.code == 200
    stale = send(harness, created["id"], created["sequence_token"], "two", "t2", prefix)
    assert_json_error(stale, 409, errcode)
    assert read(harness, created["id"], prefix).json()["data"] == "one"


def test_a_repeated_transaction_is_replayed_not_evaluated(harness: Harness) -> None:
    """A repeated txnId answers the recorded token and writes nothing, whatever it sends."""
    created = create(harness)
    session = created["id"]
    first = send(harness, session, created["sequence_token"], "one", "retry-me")
    assert first.code == 200
    token = first.json()["sequence_token"]
    other = send(harness, session, token, "from the other device", "other")
    assert other.code == 200
    again = send(harness, session, created["sequence_token"], "one", "retry-me")
    assert (again.code, again.json()) == (200, {"sequence_token": token})
    different = send(harness, session, "anything", "changed data", "retry-me")
    assert (different.code, different.json()) == (200, {"sequence_token": token})
    assert read(harness, session).json()["data"] == "from the other device"


def test_a_recorded_conflict_is_replayed_as_a_conflict(harness: Harness) -> None:
    created = create(harness)
    session = created["id"]
    assert_json_error(send(harness, session, "stale", "x", "t1"), 409, UNSTABLE_409)
    # The token named is now current, but t1's answer is recorded.
    again = send(harness, session, created["sequence_token"], "x", "t1")
    assert_json_error(again, 409, UNSTABLE_409)
    assert read(harness, session).json()["sequence_token"] == created["sequence_token"]


UNSTABLE_409 = "IO_ELEMENT_MSC4388_CONCURRENT_WRITE"


def test_transactions_are_scoped_to_the_session(harness: Harness) -> None:
    one, two = create(harness), create(harness)
    assert send(harness, one["id"], one["sequence_token"], "x", "same").code == 200
    assert send(harness, two["id"], two["sequence_token"], "y", "same").code == 200
    assert read(harness, two["id"]).json()["data"] == "y"


def test_past_the_transaction_cap_a_new_one_is_refused_and_replays_still_work() -> None:
    harness = Harness(max_transactions_per_rendezvous=3)
    created = create(harness)
    session, token = created["id"], created["sequence_token"]
    tokens = []
    for number in range(3):
        answer = send(harness, session, token, f"m{number}", f"t{number}")
        token = answer.json()["sequence_token"]
        tokens.append(token)
    refused = send(harness, session, token, "m3", "t3")
    assert_json_error(refused, 400, "M_LIMIT_EXCEEDED")
    assert send(harness, session, "x", "x", "t1").json() == {"sequence_token": tokens[1]}
    assert read(harness, session).json()["data"] == "m2"


@pytest.mark.parametrize("txn", ["has%20space", "a" * 256, "%C3%A9"])
def test_transaction_ids_outside_the_opaque_grammar_are_400(harness: Harness, txn: str) -> None:
    created = create(harness)
    answer = send(harness, created["id"], created["sequence_token"], "x", txn)
    assert_json_error(answer, 400, "M_INVALID_PARAM")


@pytest.mark.parametrize(
    ("raw", "errcode"),
    [
        (b"nope", "M_NOT_JSON"),
        (b'{"data": "x"}', "M_MISSING_PARAM"),
        (b'{"sequence_token": "t"}', "M_MISSING_PARAM"),
        (b'{"sequence_token": 1, "data": "x"}', "M_INVALID_PARAM"),
    ],
)
@pytest.mark.parametrize("txn", ["/t1", ""])
def test_send_bodies_need_a_token_and_data(
    harness: Harness, raw: bytes, errcode: str, txn: str
) -> None:
    created = create(harness)
    answer = harness.call("PUT", f"{UNSTABLE}/{created['id']}{txn}", raw, headers=JSON_TYPE)
    assert_json_error(answer, 400, errcode)
    assert read(harness, created["id"]).json()["data"] == "hello from A"


def test_a_send_over_4096_bytes_is_413_and_records_nothing(harness: Harness) -> None:
    created = create(harness)
    too_big = send(harness, created["id"], created["sequence_token"], "x" * 4097, "t1")
    assert_json_error(too_big, 413, "M_TOO_LARGE")
    assert send(harness, created["id"], created["sequence_token"], "x", "t1").code == 200


# The earlier PUT form, without a transaction id.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_earlier_put_form_is_a_compare_and_swap(harness: Harness, prefix: str) -> None:
    created = create(harness, prefix=prefix)
    answer = send(harness, created["id"], created["sequence_token"], "two", None, prefix)
    assert answer.code == 200
    token = answer.json()["sequence_token"]
    assert read(harness, created["id"], prefix).json() == {
        "data": "two",
        "sequence_token": token,
        "expires_in_ms": 300_000,
    }
    stale = send(harness, created["id"], created["sequence_token"], "three", None, prefix)
    assert_json_error(stale, 409, "M_CONCURRENT_WRITE" if prefix == STABLE else UNSTABLE_409)


def test_the_earlier_put_form_records_no_transaction() -> None:
    harness = Harness(max_transactions_per_rendezvous=1)
    created = create(harness)
    token = created["sequence_token"]
    for number in range(3):
        token = send(harness, created["id"], token, f"m{number}", None).json()["sequence_token"]
    assert send(harness, created["id"], token, "last", "t1").code == 200


# Delete and expiry.


@pytest.mark.parametrize("prefix", PREFIXES)
def test_delete_answers_200_empty_object_then_everything_is_404(
    harness: Harness, prefix: str
) -> None:
    created = create(harness, prefix=prefix)
    path = f"{prefix}/{created['id']}"
    answer = harness.call("DELETE", path)
    assert (answer.code, answer.json()) == (200, {})
    assert answer.header("content-type") == b"application/json"
    assert_json_error(harness.call("DELETE", path), 404, "M_NOT_FOUND")
    assert_json_error(read(harness, created["id"], prefix), 404, "M_NOT_FOUND")
    sent = send(harness, created["id"], created["sequence_token"], "x", prefix=prefix)
    assert_json_error(sent, 404, "M_NOT_FOUND")


def test_after_expiry_every_operation_is_404_and_transactions_go_too() -> None:
    harness = Harness(msc4388_lifetime_seconds=120)
    created = create(harness)
    assert send(harness, created["id"], created["sequence_token"], "x", "t1").code == 200
    harness.advance(120)
    assert_json_error(read(harness, created["id"]), 404, "M_NOT_FOUND")
    assert_json_error(send(harness, created["id"], "x", "x", "t1"), 404, "M_NOT_FOUND")
    assert harness.store.rendezvous_count == 0


# The API switched off, methods, CORS.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", UNSTABLE),
        ("POST", UNSTABLE),
        ("GET", STABLE),
        ("GET", f"{UNSTABLE}/abcdefghijklmnopqrstuv"),
        ("PUT", f"{UNSTABLE}/abcdefghijklmnopqrstuv/t1"),
        ("PUT", f"{STABLE}/abcdefghijklmnopqrstuv"),
        ("DELETE", f"{STABLE}/abcdefghijklmnopqrstuv"),
    ],
)
def test_switched_off_every_path_is_404_unrecognized(method: str, path: str) -> None:
    harness = Harness(msc4388="off")
    answer = harness.call(method, path, body(data="x", sequence_token="t"), headers=JSON_TYPE)
    assert_json_error(answer, 404, "M_UNRECOGNIZED")


def test_switched_off_the_stable_path_still_serves_msc4108() -> None:
    harness = Harness(msc4388="off")
    answer = harness.call("POST", STABLE, b"hi", headers={"Content-Type": "text/plain"})
    assert answer.code == 201
    json_post = harness.call("POST", STABLE, body(data="x"), headers=JSON_TYPE)
    assert_json_error(json_post, 404, "M_UNRECOGNIZED")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", UNSTABLE, b"GET, POST, OPTIONS"),
        ("DELETE", STABLE, b"GET, POST, OPTIONS"),
        ("POST", f"{UNSTABLE}/abcdefghijklmnopqrstuv", b"GET, PUT, DELETE, OPTIONS"),
        ("GET", f"{UNSTABLE}/abcdefghijklmnopqrstuv/t1", b"PUT, OPTIONS"),
        ("HEAD", UNSTABLE, b"GET, POST, OPTIONS"),
    ],
)
def test_other_methods_are_405_with_allow(
    harness: Harness, method: str, path: str, allow: bytes
) -> None:
    assert_wrong_method(harness, method, path, allow)


def test_a_preflight_from_another_origin_allows_the_access_token(harness: Harness) -> None:
    """A browser page sending its access token passes the preflight (issue 15)."""
    answer = harness.call(
        "OPTIONS",
        UNSTABLE,
        headers={
            "Origin": "https://app.element.io",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert answer.code == 204
    allowed = answer.header("access-control-allow-headers")
    assert allowed is not None
    names = {name.strip().lower() for name in allowed.decode().split(",")}
    assert {"authorization", "content-type"} <= names
    methods = answer.header("access-control-allow-methods")
    assert methods is not None and {"GET", "POST", "PUT", "DELETE"} <= {
        m.strip() for m in methods.decode().split(",")
    }
    assert answer.header("access-control-allow-origin") == b"*"


def test_the_config_defaults_are_the_proposals() -> None:
    config = Config()
    assert (config.msc4388, config.msc4388_lifetime_seconds) == ("open", 300.0)


# Hostile bodies: whatever arrives, a JSON answer below 500, and nobody else's session harmed.

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["data", "sequence_token", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.binary(max_size=300) | _JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    method=st.sampled_from(["POST", "PUT", "PUT-TXN", "GET-TOKEN"]),
    prefix=st.sampled_from(PREFIXES),
)
def test_any_body_is_answered_in_json_below_500(raw: bytes, method: str, prefix: str) -> None:
    harness = Harness()
    bystander = create(harness, "someone else's")
    target = create(harness)
    path = {
        "POST": prefix,
        "PUT": f"{prefix}/{target['id']}",
        "PUT-TXN": f"{prefix}/{target['id']}/t1",
        "GET-TOKEN": f"{prefix}/{target['id']}?sequence_token="
        + raw.decode("latin-1").encode("utf-8").hex(),
    }[method]
    verb = method.split("-")[0]
    answer = harness.call(verb, path, raw if verb != "GET" else None, headers=JSON_TYPE)
    assert answer.code < 500, answer
    assert answer.header("content-type") == b"application/json"
    answer.json()
    after = read(harness, bystander["id"])
    assert after.json()["data"] == "someone else's"
    assert after.json()["sequence_token"] == bystander["sequence_token"]
