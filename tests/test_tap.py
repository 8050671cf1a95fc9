"""
Tests for L{rendezvous_twisted.tap}: the C{twistd rendezvous} options, the
service they build, the twistd plugin and the C{.tac} file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import (
    IService,
    IServiceCollection,
    IServiceMaker,
    loadApplication,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.failure import Failure

import twisted.plugins
from rendezvous_twisted import tap
from rendezvous_twisted.core.conditions import parse
from rendezvous_twisted.core.config import Config
from rendezvous_twisted.core.memory import MemoryStore
from rendezvous_twisted.core.store import NotFound, Version
from rendezvous_twisted.http.site import RendezvousSite
from rendezvous_twisted.ops.service import StoreService
from rendezvous_twisted.redis.store import RedisStore
from rendezvous_twisted.redis.url import parse_store_url

from .conftest import answered, fired

ROOT = Path(__file__).resolve().parent.parent

#: (option, Config field, environment variable, a valid argument, its value)
LIMITS: list[tuple[str, str, str, str, Any]] = [
    ("ttl", "ttl_seconds", "RENDEZVOUS_TTL", "30.5", 30.5),
    ("max-bytes", "max_bytes", "RENDEZVOUS_MAX_BYTES", "4096", 4096),
    ("poll-timeout", "poll_timeout_seconds", "RENDEZVOUS_POLL_TIMEOUT", "5", 5.0),
    ("max-rendezvous", "max_rendezvous", "RENDEZVOUS_MAX_RENDEZVOUS", "500", 500),
    (
        "max-rendezvous-per-address",
        "max_rendezvous_per_address",
        "RENDEZVOUS_MAX_RENDEZVOUS_PER_ADDRESS",
        "4",
        4,
    ),
    ("max-parked", "max_parked", "RENDEZVOUS_MAX_PARKED", "100", 100),
    (
        "max-parked-per-rendezvous",
        "max_parked_per_rendezvous",
        "RENDEZVOUS_MAX_PARKED_PER_RENDEZVOUS",
        "2",
        2,
    ),
    ("create-burst", "create_burst", "RENDEZVOUS_CREATE_BURST", "3", 3),
    ("create-per-second", "create_per_second", "RENDEZVOUS_CREATE_PER_SECOND", "0.25", 0.25),
    ("request-burst", "request_burst", "RENDEZVOUS_REQUEST_BURST", "30", 30),
    ("request-per-second", "request_per_second", "RENDEZVOUS_REQUEST_PER_SECOND", "2.5", 2.5),
    ("max-rate-buckets", "max_rate_buckets", "RENDEZVOUS_MAX_RATE_BUCKETS", "1000", 1000),
    ("ipv6-prefix-length", "ipv6_prefix_length", "RENDEZVOUS_IPV6_PREFIX_LENGTH", "56", 56),
    ("header-timeout", "header_timeout_seconds", "RENDEZVOUS_HEADER_TIMEOUT", "2.5", 2.5),
    ("body-timeout", "body_timeout_seconds", "RENDEZVOUS_BODY_TIMEOUT", "4", 4.0),
    ("max-header-bytes", "max_header_bytes", "RENDEZVOUS_MAX_HEADER_BYTES", "4096", 4096),
    ("max-headers", "max_headers", "RENDEZVOUS_MAX_HEADERS", "32", 32),
    (
        "max-streams-per-connection",
        "max_streams_per_connection",
        "RENDEZVOUS_MAX_STREAMS_PER_CONNECTION",
        "4",
        4,
    ),
    ("max-connections", "max_connections", "RENDEZVOUS_MAX_CONNECTIONS", "500", 500),
    (
        "max-connections-per-address",
        "max_connections_per_address",
        "RENDEZVOUS_MAX_CONNECTIONS_PER_ADDRESS",
        "20",
        20,
    ),
    (
        "max-waiting-refusals",
        "max_waiting_refusals",
        "RENDEZVOUS_MAX_WAITING_REFUSALS",
        "16",
        16,
    ),
    (
        "shutdown-timeout-seconds",
        "shutdown_timeout_seconds",
        "RENDEZVOUS_SHUTDOWN_TIMEOUT_SECONDS",
        "2.5",
        2.5,
    ),
]
PUBLIC_URL = (
    "public-url",
    "public_url",
    "RENDEZVOUS_PUBLIC_URL",
    "https://h.test/rz",
    "https://h.test/rz",
)
MSC4108_SESSION_PREFIX = (
    "msc4108-session-prefix",
    "msc4108_session_prefix",
    "RENDEZVOUS_MSC4108_SESSION_PREFIX",
    "/qr/session/",
    "/qr/session/",
)
PROXY_HEADER = ("proxy-header", "proxy_header", "RENDEZVOUS_PROXY_HEADER", "forwarded", "forwarded")
EVERY_OPTION = [*LIMITS, PUBLIC_URL, MSC4108_SESSION_PREFIX, PROXY_HEADER]
INTEGER_OPTIONS = [row[0] for row in LIMITS if isinstance(row[4], int)]


def parsed(argv: list[str]) -> tap.Options:
    """
    Options parsed from C{argv}.
    """
    options = tap.Options()
    # usage.Options is unannotated; tap.py calls it the same way.
    options.parseOptions(argv)
    return options


def stop(service: IService, reactor: MemoryReactorClock) -> None:
    """
    Stop a service tree, giving the reactor the turn the store asks for.
    """
    d = service.stopService()
    assert not answered(d), "the store waits a reactor turn for answers to be written"
    reactor.advance(0)
    fired(d)


def descendants(service: Any) -> Iterator[IService]:
    """
    Every service below C{service} (an Application or a MultiService), depth first.
    """
    collection = IServiceCollection(service, None)
    if collection is None:
        return
    for child in collection:
        yield child
        yield from descendants(child)


def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Remove every RENDEZVOUS_* variable this process inherited.
    """
    for name in list(os.environ):
        if name.startswith(tap.ENVIRONMENT_PREFIX):
            monkeypatch.delenv(name)


# Options.


def test_defaults_equal_config_defaults() -> None:
    """With no arguments, the parsed Config is exactly Config()'s defaults."""
    assert parsed([])["config"] == Config()


@pytest.mark.parametrize(("option", "field", "variable", "argument", "value"), EVERY_OPTION)
def test_option_defaults_are_config_defaults(
    option: str, field: str, variable: str, argument: str, value: Any
) -> None:
    """Each option's own default (as --help shows it) is the Config field's default."""
    assert tap.Options()[option] == getattr(Config(), field)


def test_listen_defaults_to_loopback_8080() -> None:
    """Without --listen, the server listens on tcp:8080:interface=127.0.0.1 only."""
    assert parsed([])["listen"] == ["tcp:8080:interface=127.0.0.1"]


def test_listen_repeats_in_order_without_the_default() -> None:
    """--listen may repeat; every endpoint is kept, in order, and the default is not added."""
    options = parsed(["--listen", "tcp:8081", "--listen=unix:/tmp/rz.sock", "--listen", "tcp:0"])
    assert options["listen"] == ["tcp:8081", "unix:/tmp/rz.sock", "tcp:0"]


def test_listen_lists_are_not_shared_between_options() -> None:
    """Two Options instances never share one list of endpoints."""
    first = parsed(["--listen", "tcp:8081"])
    second = parsed([])
    assert first["listen"] == ["tcp:8081"]
    assert second["listen"] == ["tcp:8080:interface=127.0.0.1"]


@pytest.mark.parametrize(("option", "field", "variable", "argument", "value"), EVERY_OPTION)
def test_each_option_sets_its_config_field(
    option: str, field: str, variable: str, argument: str, value: Any
) -> None:
    """Each option sets its own Config field, coerced to the field's type, and nothing else."""
    for argv in ([f"--{option}", argument], [f"--{option}={argument}"]):
        config = parsed(argv)["config"]
        assert config == dataclasses.replace(Config(), **{field: value})
        assert type(getattr(config, field)) is type(value)


def test_all_options_together() -> None:
    """Every option given at once lands in one Config."""
    argv = [f"--{option}={argument}" for option, _, _, argument, _ in EVERY_OPTION]
    expected = Config(**{field: value for _, field, _, _, value in EVERY_OPTION})
    assert parsed(argv)["config"] == expected


@pytest.mark.parametrize("option", [row[0] for row in LIMITS])
@pytest.mark.parametrize("argument", ["abc", "", "0", "-1", "-0.5", "nan", "inf", "1e400"])
def test_bad_limit_is_a_usage_error(option: str, argument: str) -> None:
    """A limit that is not a number, or is zero, negative, NaN or infinite, is a UsageError."""
    with pytest.raises(usage.UsageError):
        parsed([f"--{option}={argument}"])


@pytest.mark.parametrize("option", INTEGER_OPTIONS)
@pytest.mark.parametrize("argument", ["1.5", "1e3", "0x10"])
def test_counts_and_sizes_must_be_integers(option: str, argument: str) -> None:
    """A count or size that is not a decimal integer is a UsageError."""
    with pytest.raises(usage.UsageError):
        parsed([f"--{option}={argument}"])


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-rendezvous=10", "--max-rendezvous-per-address=11"],
        ["--max-rendezvous=31"],
        ["--max-parked=4", "--max-parked-per-rendezvous=5"],
        ["--max-parked=7"],
    ],
)
def test_impossible_combination_is_a_usage_error(argv: list[str]) -> None:
    """A local cap above its global one, even through a default, is a UsageError naming both."""
    with pytest.raises(usage.UsageError) as caught:
        parsed(argv)
    message = str(caught.value)
    assert re.match(r"--max-\w+-per-\w+ (\d+|\(default \d+\)) must not exceed --max-", message)
    assert "_" not in message, message


@pytest.mark.parametrize(
    "url", ["example.org", "ftp://example.org/", "https://example.org/?a=b", ""]
)
def test_bad_public_url_is_a_usage_error(url: str) -> None:
    """A public URL that Config refuses is a UsageError, not a ValueError traceback."""
    with pytest.raises(usage.UsageError, match=r"^--public-url "):
        parsed([f"--public-url={url}"])


# The environment, as the .tac reads it.


def test_empty_environment_gives_defaults() -> None:
    """With no RENDEZVOUS_* variables, the options are those of an empty command line."""
    options = tap.options_from_environment({})
    assert options["config"] == Config()
    assert options["listen"] == ["tcp:8080:interface=127.0.0.1"]


def test_unrelated_variables_are_ignored() -> None:
    """Variables without the RENDEZVOUS_ prefix, or with another case, are ignored."""
    options = tap.options_from_environment(
        {"TTL": "0", "MAX_BYTES": "0", "LISTEN": "nonsense", "rendezvous_ttl": "0", "PATH": "/bin"}
    )
    assert options["config"] == Config()
    assert options["listen"] == ["tcp:8080:interface=127.0.0.1"]


@pytest.mark.parametrize(("option", "field", "variable", "argument", "value"), EVERY_OPTION)
def test_each_variable_maps_to_its_option(
    option: str, field: str, variable: str, argument: str, value: Any
) -> None:
    """Each RENDEZVOUS_* variable has exactly the effect of its command-line option."""
    options = tap.options_from_environment({variable: argument})
    assert options["config"] == parsed([f"--{option}={argument}"])["config"]
    assert getattr(options["config"], field) == value


def test_every_variable_at_once() -> None:
    """All the variables at once give the same options as all the command-line options."""
    environ = {variable: argument for _, _, variable, argument, _ in EVERY_OPTION}
    environ["RENDEZVOUS_LISTEN"] = "tcp:8081"
    argv = [f"--{option}={argument}" for option, _, _, argument, _ in EVERY_OPTION]
    expected = parsed([*argv, "--listen=tcp:8081"])
    options = tap.options_from_environment(environ)
    assert options["config"] == expected["config"]
    assert options["listen"] == expected["listen"]


def test_listen_variable_is_space_separated() -> None:
    """RENDEZVOUS_LISTEN holds several endpoints separated by any whitespace, kept in order."""
    options = tap.options_from_environment(
        {"RENDEZVOUS_LISTEN": "  tcp:8081:interface=127.0.0.1 \t tcp:8082\nunix:/tmp/rz.sock "}
    )
    assert options["listen"] == ["tcp:8081:interface=127.0.0.1", "tcp:8082", "unix:/tmp/rz.sock"]


def test_blank_listen_variable_gives_the_default() -> None:
    """A blank RENDEZVOUS_LISTEN is as if unset: the default endpoint."""
    options = tap.options_from_environment({"RENDEZVOUS_LISTEN": "  "})
    assert options["listen"] == ["tcp:8080:interface=127.0.0.1"]


@pytest.mark.parametrize(
    "environ",
    [
        {"RENDEZVOUS_MAX_BYTES": "lots"},
        {"RENDEZVOUS_TTL": "0"},
        {"RENDEZVOUS_POLL_TIMEOUT": "-1"},
        {"RENDEZVOUS_MAX_PARKED": "4", "RENDEZVOUS_MAX_PARKED_PER_RENDEZVOUS": "5"},
        {"RENDEZVOUS_PUBLIC_URL": "example.org"},
    ],
)
def test_bad_variable_is_a_usage_error(environ: dict[str, str]) -> None:
    """A bad value in the environment is refused with a UsageError, as on the command line."""
    with pytest.raises(usage.UsageError):
        tap.options_from_environment(environ)


# makeService, in memory.


def test_make_service_listens_on_every_endpoint() -> None:
    """After startService, the reactor listens on each --listen endpoint's port and interface."""
    reactor = MemoryReactorClock()
    options = parsed(
        [
            "--listen=tcp:8081:interface=127.0.0.1",
            "--listen=tcp:port=9090:backlog=7:interface=0.0.0.0",
        ]
    )
    service = tap.makeService(options, reactor=reactor)
    assert reactor.tcpServers == [], "nothing listens before the service starts"
    service.startService()
    assert [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers] == [
        (8081, 50, "127.0.0.1"),
        (9090, 7, "0.0.0.0"),
    ]
    for _, factory, _, _ in reactor.tcpServers:
        assert isinstance(factory, RendezvousSite)
    stop(service, reactor)


def test_make_service_default_listen() -> None:
    """With no --listen, the service listens on TCP 8080 of 127.0.0.1 only."""
    reactor = MemoryReactorClock()
    service = tap.makeService(parsed([]), reactor=reactor)
    service.startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers] == [
        (8080, "127.0.0.1")
    ]
    stop(service, reactor)


def test_site_runs_on_the_given_reactor_with_the_options_limits() -> None:
    """The site serves with the given reactor and refuses bodies over --max-bytes."""
    reactor = MemoryReactorClock()
    service = tap.makeService(parsed(["--max-bytes=4096", "--listen=tcp:8081"]), reactor=reactor)
    service.startService()
    [(_, site, _, _)] = reactor.tcpServers
    assert isinstance(site, RendezvousSite)
    assert site.max_body_bytes == 4096
    assert site.reactor is reactor
    stop(service, reactor)


def store_service(service: IService) -> StoreService:
    """
    The one StoreService in a service tree.
    """
    [found] = [s for s in descendants(service) if isinstance(s, StoreService)]
    return found


def test_store_uses_the_given_reactor_and_ttl() -> None:
    """The store keeps time on the given reactor: a rendezvous expires --ttl seconds later."""
    reactor = MemoryReactorClock()
    service = tap.makeService(parsed(["--ttl=30"]), reactor=reactor)
    service.startService()
    store = store_service(service).store
    version: Version = fired(store.create(b"hello", b"text/plain", "192.0.2.1"))
    assert version.expires == reactor.seconds() + 30
    reactor.advance(29)
    assert fired(store.read(version.rendezvous_id)) == version
    reactor.advance(1.5)
    with pytest.raises(NotFound):
        fired(store.read(version.rendezvous_id))
    stop(service, reactor)


def test_stop_service_stops_everything_and_answers_parked_readers() -> None:
    """stopService stops every child; the store answers its parked readers and waits a turn."""
    reactor = MemoryReactorClock()
    service = tap.makeService(parsed(["--listen=tcp:8081", "--listen=tcp:8082"]), reactor=reactor)
    service.startService()
    assert service.running
    store = store_service(service).store
    version: Version = fired(store.create(b"hello", b"text/plain", "192.0.2.1"))
    condition = parse([version.etag])
    assert condition is not None
    parked = store.wait_for_change(version.rendezvous_id, condition, 20)
    answers: list[Any] = []
    parked.addBoth(answers.append)
    assert answers == [], "the reader is parked"
    stop(service, reactor)
    # What a shut-down store answers with is test_store's business; here it
    # is enough that the StoreService in the tree shut the store down.
    assert len(answers) == 1
    assert not isinstance(answers[0], Failure), answers[0]
    assert not service.running
    assert not any(child.running for child in descendants(service))


# The plugin.


def rendezvous_plugin() -> IServiceMaker:
    """
    The service maker that twistd finds under the name "rendezvous".
    """
    [plugin] = [p for p in getPlugins(IServiceMaker, twisted.plugins) if p.tapname == "rendezvous"]
    return plugin


def test_plugin_is_found_by_tapname() -> None:
    """getPlugins(IServiceMaker) yields exactly one plugin named "rendezvous", described."""
    assert rendezvous_plugin().description


def test_plugin_options_are_the_tap_options() -> None:
    """The plugin's options are rendezvous_twisted.tap.Options, so twistd and the .tac agree."""
    assert rendezvous_plugin().options is tap.Options


def twistd(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """
    Run the venv's twistd with the repository first on PYTHONPATH.
    """
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [environ.get("PYTHONPATH")])])
    return subprocess.run(
        [str(Path(sys.executable).parent / "twistd"), *argv],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_twistd_help_lists_rendezvous(tmp_path: Path) -> None:
    """`twistd --help` lists the rendezvous command with its description."""
    result = twistd("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\s+rendezvous\s+A rendezvous server", result.stdout, re.MULTILINE), (
        result.stdout
    )


def test_twistd_rendezvous_help_lists_every_option(tmp_path: Path) -> None:
    """`twistd rendezvous --help` documents --listen and every limit option."""
    result = twistd("rendezvous", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ["listen", *(row[0] for row in EVERY_OPTION)]:
        assert re.search(rf"^\s+--{option}=", result.stdout, re.MULTILINE), option


# The .tac file.


def listen_addresses(application: Any) -> list[tuple[int, str]]:
    """
    (port, interface) of every TCP endpoint service in an application,
    read without starting it.
    """
    found = []
    for service in descendants(application):
        if isinstance(service, StreamServerEndpointService):
            assert isinstance(service.factory, RendezvousSite)
            # The endpoint keeps what strports parsed; it has no public getter.
            found.append((service.endpoint._port, service.endpoint._interface))
    return found


def load_tac(monkeypatch: pytest.MonkeyPatch, **environ: str) -> Any:
    """
    Load rendezvous.tac with exactly these RENDEZVOUS_* variables set.
    """
    clean_environment(monkeypatch)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return loadApplication(str(ROOT / "rendezvous.tac"), "python")


def test_tac_listens_where_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """The .tac's application listens on each endpoint of RENDEZVOUS_LISTEN, and only those."""
    application = load_tac(
        monkeypatch,
        RENDEZVOUS_LISTEN="tcp:18080:interface=127.0.0.2 tcp:port=18081:interface=0.0.0.0",
    )
    assert listen_addresses(application) == [(18080, "127.0.0.2"), (18081, "0.0.0.0")]
    assert not IService(application).running


def test_tac_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RENDEZVOUS_* variables, the .tac listens on 127.0.0.1:8080 with Config() limits."""
    application = load_tac(monkeypatch)
    assert listen_addresses(application) == [(8080, "127.0.0.1")]
    assert store_service(IService(application)).config == Config()


def test_tac_reads_the_limits_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The .tac builds its Config from the RENDEZVOUS_* limit variables."""
    environ = {variable: argument for _, _, variable, argument, _ in EVERY_OPTION}
    application = load_tac(monkeypatch, **environ)
    expected = Config(**{field: value for _, field, _, _, value in EVERY_OPTION})
    assert store_service(IService(application)).config == expected
    [site] = {
        s.factory for s in descendants(application) if isinstance(s, StreamServerEndpointService)
    }
    assert site.max_body_bytes == 4096


def test_bad_msc4108_session_prefix_is_a_usage_error() -> None:
    """A session prefix that Config refuses is a UsageError naming it."""
    with pytest.raises(usage.UsageError, match=r"^--msc4108-session-prefix / must be a path"):
        parsed(["--msc4108-session-prefix=/"])


@pytest.mark.parametrize(("option", "field", "variable", "argument", "value"), EVERY_OPTION)
def test_an_options_help_is_its_config_fields_description(
    option: str, field: str, variable: str, argument: str, value: Any
) -> None:
    """Each option setting a Config field is the one the field names; its help is the field's."""
    assert Config.options()[field] == option
    assert tap.Options().docs[option].startswith(Config.help(field))


def test_every_config_field_but_one_is_an_option() -> None:
    """Every Config field is set by an option named beside it, but max_content_type_bytes."""
    named = set(Config.options())
    assert named == {f.name for f in dataclasses.fields(Config)} - {"max_content_type_bytes"}
    settings = {s.option for s in tap.settings()}
    assert set(Config.options().values()) <= settings
    for network in ("trusted_proxies", "allow_create", "deny"):
        assert tap.Options().docs[Config.options()[network]] == Config.help(network)


def test_help_texts_are_wrapped_without_runs_of_spaces() -> None:
    """Every line of `twistd rendezvous --help` holds its words one space apart."""
    options = tap.Options()
    for line in str(options).splitlines():
        text = re.sub(r"^\s*(--[\w-]+=?\s+)?", "", line)
        assert "  " not in text, line


def test_store_defaults_to_memory() -> None:
    """Without --store the rendezvous live in this process' memory."""
    service = tap.makeService(parsed([]), reactor=MemoryReactorClock())
    assert isinstance(store_service(service).store, MemoryStore)


def test_store_option_and_variable_choose_redis() -> None:
    """--store redis://... (or RENDEZVOUS_STORE) keeps rendezvous in that Redis."""
    url = "redis://127.0.0.1:6390/2"
    assert parsed([f"--store={url}"])["store-url"] == parse_store_url(url)
    options = tap.options_from_environment({"RENDEZVOUS_STORE": url})
    assert options["store-url"] == parse_store_url(url)
    from twisted.internet import reactor

    service = tap.makeService(options, reactor=reactor)
    store = store_service(service).store
    assert isinstance(store, RedisStore)
    # The StoreService owns its connections, to close them only once the
    # requests in flight were answered.
    assert store_service(service).connections is store.service


@pytest.mark.parametrize("url", ["redis://", "mysql://h/0", "unix://relative"])
def test_bad_store_is_a_usage_error(url: str) -> None:
    """A --store that names no Redis stops twistd with a usage error naming --store."""
    with pytest.raises(usage.UsageError, match="--store"):
        parsed([f"--store={url}"])


def test_store_password_file_keeps_the_password_off_the_command_line(tmp_path: Path) -> None:
    """--store-password-file's one line is the Redis password, replacing any in --store."""
    secret = tmp_path / "redis-password"
    secret.write_text("s3cr:t@/\n")
    options = parsed(["--store=redis://user:old@h:1/2", f"--store-password-file={secret}"])
    assert options["store-url"] == parse_store_url("redis://user:s3cr%3At%40%2F@h:1/2")
    environ = {"RENDEZVOUS_STORE": "unix:///s", "RENDEZVOUS_STORE_PASSWORD_FILE": str(secret)}
    assert tap.options_from_environment(environ)["store-url"].password == "s3cr:t@/"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store-password-file=/nonexistent/file"], "needs a Redis store"),
        (["--store=redis://h", "--store-password-file=/nonexistent/file"], "No such file"),
    ],
)
def test_bad_store_password_file_is_a_usage_error(argv: list[str], message: str) -> None:
    """A password file without a Redis store, or one that cannot be read, is a usage error."""
    with pytest.raises(usage.UsageError, match=message):
        parsed(argv)


def test_empty_store_password_file_is_a_usage_error(tmp_path: Path) -> None:
    """An empty password file is a mistake, not "no password"."""
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(usage.UsageError, match="empty"):
        parsed(["--store=redis://h", f"--store-password-file={empty}"])


@pytest.mark.parametrize(
    "argv",
    [["--listen=tcp:65536"], ["--listen=tls:tcp6:180810"], ["--metrics=tcp:180810"]],
)
def test_a_port_past_65535_is_a_usage_error(argv: list[str]) -> None:
    """A TCP port past 65535 stops twistd with a usage error, not a traceback at listen time."""
    with pytest.raises(usage.UsageError, match="not in 0-65535"):
        parsed(argv)


@pytest.mark.parametrize("url", ["redis://rendezvous@h/0", "unix:///s.sock?user=rendezvous"])
def test_a_store_user_without_a_password_is_a_usage_error(url: str) -> None:
    """A Redis user named without a password (URL or file) is refused, not connected as nobody."""
    with pytest.raises(usage.UsageError, match="without a password"):
        parsed([f"--store={url}"])


# Ports, and endpoint descriptions checked once.


def test_a_bare_port_listens_on_the_loopback() -> None:
    """--listen 9000 means tcp:9000:interface=127.0.0.1, and --metrics 9090 the same."""
    options = parsed(["--listen", "9000", "--listen", "tcp6:9001", "--metrics", "9090"])
    assert options["listen"] == ["tcp:9000:interface=127.0.0.1", "tcp6:9001"]
    assert options["metrics"] == "tcp:9090:interface=127.0.0.1"
    reactor = MemoryReactorClock()
    tap.makeService(options, reactor=reactor).startService()
    assert [(port, interface) for port, _, _, interface in reactor.tcpServers][:1] == [
        (9000, "127.0.0.1")
    ]


@pytest.mark.parametrize(
    "description",
    [
        "8080x",
        "tcp:notaport",
        "foo:1",
        "tcp:65536",
        "tcp:8080:interface=127.0.0.1:bogus=1",
        "tcp:8080:backlog=lots",
        "unix:",
        "unix:/nonexistent/rz.sock",
        "systemd:domain=INET",
        "systemd:domain=NOWHERE:index=0",
        "systemd:domain=INET:index=first",
        "tls:ssl:443",
        "ssl:8443:sslmethod=TLSv1_METHOD",
        "",
    ],
)
def test_a_malformed_endpoint_is_a_usage_error_naming_the_option(description: str) -> None:
    """An endpoint that cannot listen is a UsageError naming --listen or --metrics, and a fix."""
    # An empty --metrics is no metrics listener (as an empty variable is).
    for option in ("listen", "metrics") if description else ("listen",):
        with pytest.raises(usage.UsageError) as caught:
            parsed([f"--{option}={description}"])
        message = str(caught.value)
        assert message.startswith(f"--{option} "), message
        assert "e.g. --" in message or "--tls-cert" in message, message
        assert "\n" not in message


@pytest.mark.parametrize(
    "description",
    [
        "tcp:0",
        "tcp:port=8080:interface=\\:\\:1:backlog=10",
        "tcp6:8080:interface=\\:\\:",
        "unix:/tmp/rz.sock:mode=660",
        "systemd:domain=INET6:name=https",
        "systemd:domain=UNIX:index=0",
    ],
)
def test_a_sound_endpoint_is_accepted(description: str) -> None:
    """Endpoint descriptions Twisted accepts are accepted, systemd's whether or not passed yet."""
    assert parsed([f"--listen={description}"])["listen"] == [description]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "9000", "--listen", "9000"], "--listen 9000 is given twice"),
        (
            ["--metrics", "8080"],
            "--metrics 8080 and --listen (default tcp:8080:interface=127.0.0.1) both listen "
            "on port 8080 of 127.0.0.1: give each its own port",
        ),
        (
            ["--listen", "8080", "--listen", "tcp:8080"],
            "--listen tcp:8080 and --listen 8080 both listen on port 8080 of 127.0.0.1",
        ),
        (
            ["--listen", "tcp6:8443:interface=\\:\\:", "--metrics", "tcp:8443:interface=\\:\\:1"],
            "both listen on port 8443 of ::1",
        ),
        (
            ["--listen", "ssl:8443:privateKey=/k.pem", "--listen", "tls:tcp:8443"],
            "--listen tls:tcp:8443 and --listen ssl:8443:privateKey=/k.pem both listen on port",
        ),
    ],
)
def test_two_listeners_on_one_port_are_a_usage_error(argv: list[str], message: str) -> None:
    """Two listeners of this server on one TCP port are refused, naming both as written."""
    options = tap.Options()
    # The clash is found by address alone: no certificate is read for it.
    options._check_tls = lambda: None  # type: ignore[method-assign]
    with pytest.raises(usage.UsageError) as caught:
        options.parseOptions(argv)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--listen", "tcp:8080:interface=127.0.0.1", "--listen", "tcp:8080:interface=127.0.0.2"],
        ["--listen", "tcp:8080:interface=127.0.0.1", "--listen", "tcp6:8080:interface=\\:\\:1"],
        ["--listen", "tcp:0", "--listen", "tcp:0", "--metrics", "tcp:0"],
        ["--listen", "8080", "--metrics", "9090"],
        ["--listen", "unix:/tmp/rz.sock", "--metrics", "8080"],
    ],
)
def test_listeners_that_can_share_a_port_are_accepted(argv: list[str]) -> None:
    """Different interfaces, families or port 0 are no clash."""
    parsed(argv)


@pytest.mark.parametrize(
    ("description", "meant"),
    [
        ("0.0.0.0:9000", "--listen tcp:9000:interface=0.0.0.0"),
        (":9000", "--listen tcp:9000:interface=0.0.0.0"),
        ("localhost:9000", "--listen tcp:9000:interface=localhost"),
        ("tpc:9000", "--listen tcp:9000"),
        ("sytemd:domain=INET:index=0", "--listen systemd:domain=INET:index=0"),
        ("tls:8443", "--listen ssl:8443 or --listen tls:tcp:8443"),
    ],
)
def test_a_likely_meaning_is_the_example(description: str, meant: str) -> None:
    """A HOST:PORT, a misspelt kind or tls: before a bare port get the endpoint meant as example."""
    with pytest.raises(usage.UsageError) as caught:
        parsed(["--listen", description])
    assert str(caught.value).endswith(f"; e.g. {meant}"), str(caught.value)


def test_every_setting_is_derived_from_the_options() -> None:
    """settings() lists every option of Options, however declared, with its variable and default."""
    found = {s.option: s for s in tap.settings()}
    options = tap.Options()
    declared = {name.rstrip("=") for name in options.longOpt} - {"help", "version"}
    assert set(found) == declared
    assert found["ttl"].variable == "RENDEZVOUS_TTL" and found["ttl"].default == 60.0
    assert found["listen"].repeatable and found["listen"].default == [
        "tcp:8080:interface=127.0.0.1"
    ]
    assert found["trusted-proxy"].repeatable and found["trusted-proxy"].default == []
    assert not found["no-access-log"].takes_value
    assert found["public-url"].default is None


def test_an_option_added_the_usual_way_has_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """An option added to Options alone is read from its RENDEZVOUS_* variable: no list to keep."""
    monkeypatch.setattr(
        tap.Options,
        "optParameters",
        [*tap.Options.optParameters, ["new-knob", None, "off", "A knob added later."]],
    )
    assert tap.options_from_environment({"RENDEZVOUS_NEW_KNOB": "on"})["new-knob"] == "on"
    assert "RENDEZVOUS_NEW_KNOB" in {s.variable for s in tap.settings()}


def test_a_coercer_of_an_option_added_later_speaks_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError from an option's own coercer is the usage error, without Twisted's preamble."""

    def knob(value: str) -> int:
        if not value.isdigit():
            raise ValueError(f"--knob {value}: not a number of turns")
        return int(value)

    monkeypatch.setattr(
        tap.Options,
        "optParameters",
        [*tap.Options.optParameters, ["knob", None, 1, "Turns.", knob]],
    )
    with pytest.raises(usage.UsageError) as caught:
        parsed(["--knob", "lots"])
    assert str(caught.value) == "--knob lots: not a number of turns"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"RENDEZVOUS_TTLL": "5"},
            "RENDEZVOUS_TTLL=5: no such setting; did you mean RENDEZVOUS_TTL?",
        ),
        ({"RENDEZVOUS_OPTIONS": "--ttl 5"}, "RENDEZVOUS_OPTIONS=--ttl 5: no such setting"),
        ({"RENDEZVOUS_TTL": "abc"}, "RENDEZVOUS_TTL=abc: not a number, e.g. RENDEZVOUS_TTL=60"),
        ({"RENDEZVOUS_LISTEN": "8080 80x"}, "RENDEZVOUS_LISTEN=80x: unknown endpoint type"),
    ],
)
def test_environment_mistakes_name_the_variable(environ: dict[str, str], message: str) -> None:
    """A misspelt RENDEZVOUS_* variable is refused with a guess; a bad value names its variable."""
    with pytest.raises(usage.UsageError) as caught:
        tap.options_from_environment(environ)
    assert str(caught.value).startswith(message), caught.value


def test_a_program_exits_with_two_lines_rather_than_raising() -> None:
    """Run as a program, a usage error ends it with the message and a pointer to the help."""
    options = tap.Options()
    options.program = "twistd rendezvous"
    with pytest.raises(SystemExit) as caught:
        options.parseOptions(["--ttl", "abc"])
    assert str(caught.value) == (
        "twistd rendezvous: --ttl abc: not a number, e.g. --ttl 60\nsee: twistd rendezvous --help"
    )


def test_version_option_names_this_package(tmp_path: Path) -> None:
    """`twistd rendezvous --version` names rendezvous-twisted with its version, and Twisted's."""
    result = twistd("rendezvous", "--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        r"rendezvous-twisted \d+\.\d+\.\d+\S* \(Twisted \S+, Python \S+\)\n", result.stdout
    ), result.stdout


def test_the_help_ends_with_what_the_server_does_today() -> None:
    """The help says both stores, and where twistd's own options go."""
    text = " ".join(str(tap.Options()).split())
    assert "holding rendezvous in memory" not in text
    assert "--store" in text and "before 'rendezvous'" in text
