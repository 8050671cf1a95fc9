"""
A real browser: headless Chromium (Debian's, driven by Playwright; never a
downloaded build) runs a whole exchange with fetch() from two pages served by
a second twisted.web server, on another origin than the rendezvous server,
so that every request goes through CORS as it does for a web client.

Without the CORS headers the browser needs, a fetch() fails (a TypeError in
the page) or a header reads as null, and these tests fail.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .homeserver import USER_TOKEN, homeserver
from .test_end_to_end import HOST, LISTEN, TwistdServer, running, start_plugin_server

CHROMIUM = Path("/usr/bin/chromium")
PAGES = Path(__file__).resolve().parent / "browser"
#: twistd web's line once it listens.
_SITE_LINE = re.compile(rb"\bSite starting on (\d+)")
#: Bound on every browser step (milliseconds, Playwright's unit).
STEP_TIMEOUT_MS = 15_000

#: No network beyond loopback here: without these, Chromium keeps trying to
#: reach Google's services (updates, sync, safe browsing, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-breakpad",
    "--no-pings",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication",
    # And whatever a release adds: no name resolves but the loopback address
    # the test uses, so nothing can be looked up, let alone reached.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="module")
def rendezvous_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    The rendezvous server, as a user starts it.
    """
    yield from running(start_plugin_server(tmp_path_factory.mktemp("twistd"), "--poll-timeout=15"))


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    A plain twisted.web static server for the pages: another port, so
    another origin.
    """
    process = TwistdServer(
        ["web", "--path", str(PAGES), "--listen", LISTEN],
        tmp_path_factory.mktemp("pages"),
        port_line=_SITE_LINE,
    )
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """
    Debian's Chromium, headless, with a fresh profile.
    """
    assert CHROMIUM.exists() or shutil.which("chromium"), (
        "Debian's chromium is needed (apt-get install -y chromium; .ci/run does)"
    )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=str(CHROMIUM),
            headless=True,
            chromium_sandbox=False,
            args=CHROMIUM_ARGS,
            timeout=STEP_TIMEOUT_MS * 2,
        )
        context.set_default_timeout(STEP_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


def open_page(browser: Any, page_server: TwistdServer) -> Any:
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{HOST}:{page_server.port}/exchange.html")
    page.wait_for_function("() => window.rendezvous !== undefined")
    assert not errors, errors
    return page


def call(page: Any, function: str, *args: Any) -> dict[str, Any]:
    """
    Run one of exchange.js' functions in the page and return its answer;
    fails on a fetch() the browser refused (a CORS failure).
    """
    result: dict[str, Any] = page.evaluate(
        f"(args) => window.rendezvous.{function}(...args)", list(args)
    )
    assert "error" not in result, f"{function}{args} failed in the browser: {result['error']}"
    return result


def test_two_pages_run_a_whole_exchange_across_origins(
    rendezvous_server: TwistdServer, page_server: TwistdServer, browser: Any
) -> None:
    """Two cross-origin pages create, read, long-poll, write, get a 412, delete and get a 404."""
    base = f"http://{HOST}:{rendezvous_server.port}/"
    assert page_server.port != rendezvous_server.port
    a = open_page(browser, page_server)
    b = open_page(browser, page_server)
    assert a.evaluate("location.origin") != base.rstrip("/")

    # A creates (a JSON body type, so that even the POST needs a preflight).
    created = call(a, "create", base, '{"offer": 1}', "application/json")
    assert created["status"] == 200
    url = created["headers"]["location"]
    assert url is not None and url.startswith(base), created
    etag = created["headers"]["etag"]
    assert etag is not None and etag.startswith('"'), created
    assert created["headers"]["x-max-bytes"] == "10240"
    assert created["headers"]["expires"] and created["headers"]["last-modified"]

    # B reads it: the body and its exact Content-Type.
    read = call(b, "read", url)
    assert read["status"] == 200
    assert read["body"] == '{"offer": 1}'
    assert read["headers"]["content-type"] == "application/json"
    assert read["headers"]["etag"] == etag

    # A polls with nothing new: a 304 the page sees, with its ETag.
    unchanged = call(a, "poll", url, etag, 1)
    assert unchanged["status"] == 304
    assert unchanged["headers"]["etag"] == etag

    # A long-polls; B's own round trip finds it still waiting; B's PUT wakes it.
    a.evaluate("([url, etag]) => window.rendezvous.startPoll(url, etag, 15)", [url, etag])
    a.wait_for_function("() => window.rendezvous.pending !== null")
    assert call(b, "read", url)["status"] == 200
    assert a.evaluate("window.rendezvous.settled") is False
    written = call(b, "write", url, "answer from B", "text/plain", etag)
    assert written["status"] == 202
    new_etag = written["headers"]["etag"]
    assert new_etag is not None and new_etag != etag
    woken: dict[str, Any] = a.evaluate("window.rendezvous.pending")
    assert "error" not in woken, woken
    assert woken["status"] == 200
    assert woken["body"] == "answer from B"
    assert woken["headers"]["content-type"] == "text/plain"
    assert woken["headers"]["etag"] == new_etag

    # A write on the stale ETag is refused, and the page can read why.
    stale = call(a, "write", url, "too late", "text/plain", etag)
    assert stale["status"] == 412
    assert stale["headers"]["etag"] == new_etag
    assert '"M_CONCURRENT_WRITE"' in stale["body"]

    # A deletes; B finds it gone.
    assert call(a, "remove", url)["status"] == 204
    gone = call(b, "read", url)
    assert gone["status"] == 404
    assert '"M_NOT_FOUND"' in gone["body"]


def test_two_pages_run_an_msc4108_exchange_across_origins(
    rendezvous_server: TwistdServer, page_server: TwistdServer, browser: Any
) -> None:
    """As Element Web does: MSC4108 create, read, 304, long-poll, PUT, 412 and delete, via CORS."""
    base = f"http://{HOST}:{rendezvous_server.port}"
    a = open_page(browser, page_server)
    b = open_page(browser, page_server)

    created = call(
        a,
        "create",
        base + "/_matrix/client/unstable/org.matrix.msc4108/rendezvous",
        "A",
        "text/plain",
    )
    assert created["status"] == 201
    url = json.loads(created["body"])["url"]
    assert url.startswith(base + "/")
    etag = created["headers"]["etag"]
    assert etag is not None

    read = call(b, "read", url)
    assert (read["status"], read["body"], read["headers"]["content-type"]) == (
        200,
        "A",
        "text/plain",
    )
    unchanged = call(a, "poll", url, etag, 1)
    assert (unchanged["status"], unchanged["headers"]["etag"]) == (304, etag)
    assert unchanged["headers"]["expires"] and unchanged["headers"]["last-modified"]

    a.evaluate("([url, etag]) => window.rendezvous.startPoll(url, etag, 15)", [url, etag])
    a.wait_for_function("() => window.rendezvous.pending !== null")
    written = call(b, "write", url, "B", "text/plain", etag)
    assert written["status"] == 202
    woken: dict[str, Any] = a.evaluate("window.rendezvous.pending")
    assert (woken.get("status"), woken.get("body")) == (200, "B"), woken
    assert woken["headers"]["etag"] == written["headers"]["etag"]

    stale = call(a, "write", url, "late", "text/plain", etag)
    assert stale["status"] == 412
    assert json.loads(stale["body"])["org.matrix.msc4108.errcode"] == "M_CONCURRENT_WRITE"
    assert call(a, "remove", url)["status"] == 204
    assert call(b, "read", url)["status"] == 404


@pytest.fixture(scope="module")
def authenticated_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    """
    A rendezvous server that lets only a homeserver's users create MSC4388
    sessions, and the homeserver (a stand-in on loopback).
    """
    with homeserver() as hs:
        process = start_plugin_server(
            tmp_path_factory.mktemp("authenticated"),
            "--msc4388=authenticated",
            f"--homeserver={hs.url}",
            "--poll-timeout=15",
        )
        process.secrets.append(USER_TOKEN.encode("ascii"))
        yield from running(process)


def test_two_pages_run_an_msc4388_exchange_with_an_access_token(
    authenticated_server: TwistdServer, page_server: TwistdServer, browser: Any
) -> None:
    """
    As the next Element Web will: page A, signed in, discovers and creates
    with its access token (a preflighted Authorization header from another
    origin); page B, the new device, reads, long-polls and sends without one.
    """
    api = f"http://{HOST}:{authenticated_server.port}/_matrix/client/v1/rendezvous"
    a = open_page(browser, page_server)
    b = open_page(browser, page_server)

    anonymous = call(b, "json", "GET", api, None, None)
    assert json.loads(anonymous["body"]) == {"create_available": False}
    discovered = call(a, "json", "GET", api, None, USER_TOKEN)
    assert (discovered["status"], json.loads(discovered["body"])) == (
        200,
        {"create_available": True},
    )
    created = call(a, "json", "POST", api, {"data": ""}, USER_TOKEN)
    assert created["status"] == 200, created
    session = json.loads(created["body"])
    url = f"{api}/{session['id']}"

    read = call(b, "json", "GET", url, None, None)
    assert json.loads(read["body"])["sequence_token"] == session["sequence_token"]
    a.evaluate(
        "([url, token]) => window.rendezvous.startTokenPoll(url, token)",
        [url, session["sequence_token"]],
    )
    a.wait_for_function("() => window.rendezvous.pending !== null")
    sent = call(
        b,
        "json",
        "PUT",
        f"{url}/txn-b-1",
        {"sequence_token": session["sequence_token"], "data": "LoginInitiateMessage"},
        None,
    )
    assert sent["status"] == 200, sent
    token = json.loads(sent["body"])["sequence_token"]
    woken: dict[str, Any] = a.evaluate("window.rendezvous.pending")
    assert woken.get("status") == 200, woken
    assert json.loads(woken["body"])["data"] == "LoginInitiateMessage"

    stale = call(
        a,
        "json",
        "PUT",
        f"{url}/txn-a-1",
        {"sequence_token": session["sequence_token"], "data": "late"},
        None,
    )
    assert (stale["status"], json.loads(stale["body"])["errcode"]) == (409, "M_CONCURRENT_WRITE")
    assert json.loads(call(a, "json", "GET", url, None, None)["body"])["sequence_token"] == token
    assert call(b, "json", "DELETE", url, None, None)["status"] == 200
    assert call(a, "json", "GET", url, None, None)["status"] == 404
