"""
MSC4388's create policies end to end: the server as users start it
(C{twistd -n rendezvous --msc4388 authenticated --homeserver ...}), asking a
real homeserver stand-in (tests/homeserver.py) about access tokens over
real sockets, driven by the client written from the proposal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .homeserver import GUEST_TOKEN, USER_TOKEN, Homeserver, homeserver
from .msc4388_client import STABLE_PREFIX, UNSTABLE_PREFIX, MatrixError, ProposalClient
from .test_end_to_end import HOST, TwistdServer, running, start_plugin_server
from .test_msc4388_end_to_end import expect_error, whole_exchange


@pytest.fixture(scope="module")
def hs() -> Iterator[Homeserver]:
    with homeserver() as started:
        yield started


@pytest.fixture(scope="module")
def server(hs: Homeserver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwistdServer]:
    cwd = tmp_path_factory.mktemp("authenticated")
    process = start_plugin_server(
        cwd, "--msc4388=authenticated", f"--homeserver={hs.url}", "--poll-timeout=10"
    )
    process.secrets.extend(token.encode("ascii") for token in (USER_TOKEN, GUEST_TOKEN))
    yield from running(process)


@pytest.mark.parametrize("prefix", [UNSTABLE_PREFIX, STABLE_PREFIX])
def test_a_user_with_a_valid_token_runs_a_whole_exchange(server: TwistdServer, prefix: str) -> None:
    """Only A holds a token: B, the new device, needs none to read and send."""
    a = ProposalClient(HOST, server.port, prefix, access_token=USER_TOKEN)
    b = ProposalClient(HOST, server.port, prefix)
    whole_exchange(a, b)


def test_without_a_token_create_is_refused_and_discovery_says_so(server: TwistdServer) -> None:
    anonymous = ProposalClient(HOST, server.port)
    assert anonymous.discover() is False
    expect_error(403, "M_FORBIDDEN", anonymous.create, "x")


def test_a_guest_may_not_create(server: TwistdServer) -> None:
    guest = ProposalClient(HOST, server.port, access_token=GUEST_TOKEN)
    assert guest.discover() is False
    expect_error(403, "M_FORBIDDEN", guest.create, "x")


def test_an_invalid_token_is_401_never_anonymous(server: TwistdServer, hs: Homeserver) -> None:
    client = ProposalClient(HOST, server.port, access_token="syt_expired_0003")
    expect_error(401, "M_UNKNOWN_TOKEN", client.discover)
    expect_error(401, "M_UNKNOWN_TOKEN", client.create, "x")
    assert "syt_expired_0003" in hs.asked


def test_verdicts_are_cached(server: TwistdServer, hs: Homeserver) -> None:
    """Discovery then create with one token ask the homeserver once."""
    client = ProposalClient(HOST, server.port, access_token=USER_TOKEN)
    client.discover()
    before = hs.asked.count(USER_TOKEN)
    client.discover()
    client.create("x")
    assert hs.asked.count(USER_TOKEN) == before


def test_an_unreachable_homeserver_is_503_never_an_open_door(tmp_path: Path) -> None:
    with homeserver() as gone:
        url = gone.url
    process = start_plugin_server(
        tmp_path, "--msc4388=authenticated", f"--homeserver={url}", "--homeserver-timeout=2"
    )
    with contextmanager(running)(process):
        client = ProposalClient(HOST, process.port, access_token=USER_TOKEN)
        with pytest.raises(MatrixError) as raised:
            client.create("x")
        assert raised.value.status == 503
        expect_error(503, "M_UNKNOWN", client.discover)
