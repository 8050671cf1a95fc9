"""
The layout of the package, as the "One room per job" issue left it: no
module over about 600 lines, imports that run one way between the layers,
no private Klein name, private Twisted names only in the fenced modules
listed here (each name with the module that may use it), and no question of
which store the server holds outside the store's factory.

Everything is read with L{ast} from the package's source (and, for what a
class overrides, from the classes themselves), never by grepping text.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import rendezvous_twisted

PACKAGE = Path(rendezvous_twisted.__file__).resolve().parent
ROOT = PACKAGE.parent
NAME = "rendezvous_twisted"

#: The most lines a module may have.
MAX_LINES = 600

#: The modules every layer may import: they import nothing of the package
#: but its version.
SHARED = frozenset(("package", "words", "version"))

#: What each layer may import of the package, besides itself and SHARED.
#: The core knows nothing of the others; the Redis store only the core;
#: the wire only the core; a protocol only the core and the wire; the
#: running server anything but a protocol (tap composes those), and the
#: client speaks HTTP to any server: nothing of this one.
MAY_IMPORT: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "redis": frozenset({"core"}),
    "http": frozenset({"core"}),
    "protocols": frozenset({"core", "http"}),
    "ops": frozenset({"core", "http", "redis"}),
    "client": frozenset(),
    "words": frozenset(),
    "version": frozenset(),
    "package": frozenset(),
    "tap": frozenset({"core", "redis", "http", "protocols", "ops"}),
}

#: Every private name of Twisted (an attribute or a module whose name starts
#: with one underscore, reached on a Twisted object or overridden in a
#: subclass of one), by the one module that may use it: the fenced modules,
#: each with a test that fails loudly when Twisted changes the name
#: (tests/test_http2_fence.py for the HTTP/2 family).
TWISTED_PRIVATE: dict[str, frozenset[str]] = {
    # The HTTP/2 family's fence: http2.PRIVATE_NAMES and tests/test_http2_fence.py.
    "http/http2.py": frozenset(
        {
            "twisted.web._http2",
            "_END_STREAM_SENTINEL",
            "_aborted",
            "_bufferedControlFrameBytes",
            "_bufferedControlFrames",
            "_consumerBlocked",
            "_handleWindowUpdate",
            "_log",
            "_maxBufferedControlFrameBytes",
            "_outboundStreamQueues",
            "_request",
            "_requestDataReceived",
            "_requestDone",
            "_requestEnded",
            "_requestReceived",
            "_sendPrioritisedData",
            "_sendingDeferred",
            "_terminate",
            "_tryToWriteControlData",
        }
    ),
    # The HTTP/1.1 request and channel's fence: their PRIVATE_NAMES and
    # tests/test_http1_fence.py.
    "http/request.py": frozenset({"_cleanup", "_command", "_disconnected"}),
    "http/channel.py": frozenset({"_handlingRequest", "_respondToBadRequestAndDisconnect"}),
}

#: Where the server may ask which store it holds: the store's factory, as
#: (module, function).  Nowhere else.
STORE_FACTORY: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Module:
    """
    One module of the package: its path from the package, dotted name,
    layer and syntax tree.
    """

    path: Path
    relative: str
    dotted: str
    layer: str
    tree: ast.Module
    lines: int


def _layer(relative: str) -> str:
    first = relative.split("/", 1)[0]
    if first == "__init__.py":
        return "package"
    return first.removesuffix(".py")


@functools.cache
def modules() -> tuple[Module, ...]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        dotted = ".".join((NAME, *relative.removesuffix(".py").split("/")))
        dotted = dotted.removesuffix(".__init__")
        text = path.read_text(encoding="utf-8")
        found.append(
            Module(
                path,
                relative,
                dotted,
                _layer(relative),
                ast.parse(text, str(path)),
                len(text.splitlines()),
            )
        )
    return tuple(found)


def _ids(items: tuple[Module, ...]) -> list[str]:
    return [module.relative for module in items]


# (a) Size.


@pytest.mark.parametrize("module", modules(), ids=_ids(modules()))
def test_no_module_is_over_600_lines(module: Module) -> None:
    """Every module of the package has at most MAX_LINES lines."""
    assert module.lines <= MAX_LINES, (
        f"rendezvous_twisted/{module.relative} has {module.lines} lines, over {MAX_LINES}: "
        "split it along its jobs (see docs/architecture.md)"
    )


# (b) Imports one way.


def imported(module: Module) -> Iterator[tuple[int, str]]:
    """
    Every module name C{module} imports (absolute, relative ones resolved),
    with its line, wherever the import is (top level, a function, under
    TYPE_CHECKING).
    """
    package = (
        module.dotted if module.path.name == "__init__.py" else module.dotted.rsplit(".", 1)[0]
    )
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield node.lineno, source
            for alias in node.names:
                # "from rendezvous_twisted.ops import tls" imports a module.
                yield node.lineno, f"{source}.{alias.name}"


def _layer_of(dotted: str) -> str | None:
    """
    The layer of a module name of the package (None for any other):
    C{rendezvous_twisted.http.site} is in C{http}, C{rendezvous_twisted}
    and its C{__version__} in C{package}.
    """
    parts = dotted.split(".")
    if parts[0] != NAME:
        return None
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "package"


@pytest.mark.parametrize("module", modules(), ids=_ids(modules()))
def test_imports_run_one_way(module: Module) -> None:
    """A module imports only the layers below its own (MAY_IMPORT) and the shared modules."""
    allowed = MAY_IMPORT[module.layer] | SHARED | {module.layer}
    wrong = sorted(
        {
            f"line {line}: {name} ({layer})"
            for line, name in imported(module)
            if (layer := _layer_of(name)) is not None and layer not in allowed
        }
    )
    assert not wrong, (
        f"rendezvous_twisted/{module.relative} ({module.layer}) may import only "
        f"{sorted(allowed)}, but imports: {'; '.join(wrong)}"
    )


# Private names: what the package reaches that is not its own.


def _attribute_names(tree: ast.AST) -> Iterator[tuple[int, str, bool]]:
    """
    Every attribute name reached in C{tree}: C{x.name}, and C{getattr},
    C{hasattr} and C{setattr} with a constant name; with whether it is
    reached on C{self} or C{cls} (an object's own).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, node.attr, _is_self(node.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr", "setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            yield node.lineno, node.args[1].value, _is_self(node.args[0])


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


def _defined_names(tree: ast.AST) -> Iterator[str]:
    """
    The names C{tree} defines: functions, classes, what it assigns (as a
    name or as an attribute of anything: C{self._x = ...}), and slots.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            yield node.id
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            yield node.attr
        elif isinstance(node, ast.alias):
            yield node.asname or node.name.split(".")[0]
        elif isinstance(node, ast.arg):
            yield node.arg


@functools.cache
def own_names() -> frozenset[str]:
    """
    Every name the package defines somewhere.
    """
    return frozenset(name for module in modules() for name in _defined_names(module.tree))


_IDENTIFIER = re.compile(r"(?<![\w.])_[A-Za-z]\w*|(?<=\.)_[A-Za-z]\w*")


@functools.cache
def private_names_of(package: str) -> frozenset[str]:
    """
    Every private identifier in an installed package's source (its tests
    left out): a superset of the private names it defines, enough to tell
    whose a name the package uses may be.
    """
    root = Path(importlib.import_module(package).__file__ or "").parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        if "test" in path.relative_to(root).parts:
            continue
        names.update(_IDENTIFIER.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names)


def dependency_names() -> frozenset[str]:
    return private_names_of("twisted") | private_names_of("klein")


@dataclass(frozen=True, order=True)
class Use:
    """
    A private name a module of the package uses, and where.
    """

    module: str
    line: int
    name: str
    how: str


def _private_imports(module: Module, package: str) -> Iterator[Use]:
    """
    Imports of C{package}'s private modules (C{twisted.web._http2}) and
    private names (C{from twisted.web._http2 import _END_STREAM_SENTINEL}).
    """
    for line, name in imported(module):
        parts = name.split(".")
        if parts[0] != package or not any(_private(part) for part in parts):
            continue
        first = next(i for i, part in enumerate(parts) if _private(part))
        yield Use(module.relative, line, ".".join(parts[: first + 1]), "import")
        if first < len(parts) - 1 and _private(parts[-1]):
            yield Use(module.relative, line, parts[-1], "import")


def _foreign_attributes(module: Module) -> Iterator[Use]:
    """
    Private attributes the module reaches that are a dependency's: one the
    package defines nowhere, or one reached on another object than C{self}
    that Twisted or Klein has.
    """
    for line, name, own in _attribute_names(module.tree):
        if not _private(name):
            continue
        if name not in own_names() or (not own and name in dependency_names()):
            yield Use(module.relative, line, name, "attribute")


def _klein_names(module: Module) -> set[str]:
    """
    The names C{module} binds to Klein (C{import klein}, C{from klein import
    Klein}).
    """
    names = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "klein":
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "klein":
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _reached_through(module: Module, roots: set[str]) -> Iterator[Use]:
    """
    Private attributes reached on a name bound to Klein: C{Klein._x}.
    """
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base: ast.AST = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in roots:
                yield Use(module.relative, node.lineno, node.attr, "attribute")


def _classes(module: Module) -> Iterator[tuple[ast.ClassDef, type]]:
    imported_module = importlib.import_module(module.dotted)
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ClassDef) and node.bases:
            cls = getattr(imported_module, node.name, None)
            if isinstance(cls, type):
                yield node, cls


@functools.cache
def _source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _foreign_bases(cls: type, package: str) -> list[type]:
    return [base for base in cls.__mro__[1:] if base.__module__.split(".")[0] == package]


@functools.cache
def _overrides(module: Module, package: str) -> tuple[Use, ...]:
    return tuple(_find_overrides(module, package))


def _find_overrides(module: Module, package: str) -> Iterator[Use]:
    """
    Private names a class of the module defines (in its body, or as
    C{self._x} in its methods) that a base class of C{package} has: an
    override of, or a write to, that package's private name.
    """
    for node, cls in _classes(module):
        bases = _foreign_bases(cls, package)
        if not bases:
            continue
        defined: dict[str, int] = {}
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                defined.setdefault(item.name, item.lineno)
            elif isinstance(item, ast.Assign | ast.AnnAssign):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        defined.setdefault(target.id, item.lineno)
        for sub in ast.walk(node):
            if (
                isinstance(sub, ast.Attribute)
                and isinstance(sub.ctx, ast.Store)
                and isinstance(sub.value, ast.Name)
                and sub.value.id == "self"
            ):
                defined.setdefault(sub.attr, sub.lineno)
        for name, line in defined.items():
            if not _private(name):
                continue
            pattern = re.compile(rf"\bself\.{re.escape(name)}\b")
            for base in bases:
                if name in vars(base) or pattern.search(_source(base)):
                    yield Use(module.relative, line, name, f"override in {node.name}")
                    break


def _describe(uses: list[Use]) -> str:
    return "; ".join(f"rendezvous_twisted/{u.module}:{u.line} {u.name} ({u.how})" for u in uses)


# (c) No private Klein name.


@pytest.mark.parametrize("module", modules(), ids=_ids(modules()))
def test_no_private_klein_name(module: Module) -> None:
    """No module imports a private Klein module or name, or reaches a Klein private attribute."""
    klein_only = private_names_of("klein") - private_names_of("twisted")
    uses = sorted(
        {
            *_private_imports(module, "klein"),
            *_reached_through(module, _klein_names(module)),
            *(use for use in _foreign_attributes(module) if use.name in klein_only),
            *_overrides(module, "klein"),
        }
    )
    assert not uses, f"Klein through its public API only: {_describe(uses)}"


# (d) Private Twisted names only in the fenced modules.


@functools.cache
def twisted_uses(module: Module) -> list[Use]:
    """
    The private Twisted names C{module} uses: imports of C{twisted.*._x},
    private attributes no module of the package defines (a dependency's:
    Twisted's, unless Klein's alone), and overrides in subclasses of
    Twisted's classes.
    """
    klein_only = private_names_of("klein") - private_names_of("twisted")
    return sorted(
        {
            *_private_imports(module, "twisted"),
            *(use for use in _foreign_attributes(module) if use.name not in klein_only),
            *_overrides(module, "twisted"),
        }
    )


@pytest.mark.parametrize("module", modules(), ids=_ids(modules()))
def test_private_twisted_names_only_where_fenced(module: Module) -> None:
    """Each private Twisted name a module uses is one TWISTED_PRIVATE allows that module."""
    allowed = TWISTED_PRIVATE.get(module.relative, frozenset())
    uses = [use for use in twisted_uses(module) if use.name not in allowed]
    assert not uses, (
        "a private Twisted name outside its fence (use a public API, or fence it in one module "
        f"with a test that fails when Twisted changes it, and list it here): {_describe(uses)}"
    )


def test_the_http1_fence_checks_what_is_listed_here() -> None:
    """The private Twisted names allowed to the HTTP/1.1 request and channel are their fence's."""
    from rendezvous_twisted.http import channel, request

    for module, listed in ((request, "http/request.py"), (channel, "http/channel.py")):
        assert {name for _, name in module.PRIVATE_NAMES} == TWISTED_PRIVATE[listed]


def test_the_http2_fence_checks_what_is_listed_here() -> None:
    """The private Twisted names allowed to http2.py are those its fence test checks."""
    http2 = pytest.importorskip("rendezvous_twisted.http.http2")
    fenced: set[str] = set()
    for owner, name in http2.PRIVATE_NAMES:
        if owner.startswith("twisted."):
            fenced.update(part for part in owner.split(".") if _private(part))
            if _private(name):
                fenced.add(name)
    private_module = {name for name in TWISTED_PRIVATE["http/http2.py"] if "." in name}
    listed = {name for name in TWISTED_PRIVATE["http/http2.py"] if "." not in name}
    assert private_module == {"twisted.web._http2"}
    assert fenced == listed | {"_http2"}


def test_the_fence_lists_only_what_is_used() -> None:
    """Every name TWISTED_PRIVATE allows is still used by its module: the list stays true."""
    by_path = {module.relative: module for module in modules()}
    stale = []
    for relative, names in sorted(TWISTED_PRIVATE.items()):
        module = by_path.get(relative)
        used = {use.name for use in twisted_uses(module)} if module is not None else set()
        stale += [f"{relative}: {name}" for name in sorted(names - used)]
    assert not stale, f"no longer used, take them off TWISTED_PRIVATE: {'; '.join(stale)}"


# (e) Nothing asks which store it holds.


@functools.cache
def store_classes() -> frozenset[str]:
    """
    The store classes of the package: every class named C{...Store}.
    """
    return frozenset(
        node.name
        for module in modules()
        for node in ast.walk(module.tree)
        if isinstance(node, ast.ClassDef) and node.name.endswith("Store")
    )


def _names_in(node: ast.AST) -> Iterator[str]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            yield sub.id
        elif isinstance(sub, ast.Attribute):
            yield sub.attr


def _functions(tree: ast.AST) -> Iterator[tuple[str, ast.AST]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node


@pytest.mark.parametrize("module", modules(), ids=_ids(modules()))
def test_no_isinstance_on_a_store_outside_its_factory(module: Module) -> None:
    """No isinstance(..., <a store class>) outside STORE_FACTORY: the store contract is whole."""
    inside_factory: set[int] = set()
    for name, function in _functions(module.tree):
        if (module.relative, name) in STORE_FACTORY:
            inside_factory.update(id(node) for node in ast.walk(function))
    asks = sorted(
        f"rendezvous_twisted/{module.relative}:{node.lineno}"
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and set(_names_in(node.args[1])) & store_classes()
        and id(node) not in inside_factory
    )
    assert not asks, f"asks which store it holds (put what it needs on the contract): {asks}"


# The checks themselves.


def _made_up(relative: str, source: str) -> Module:
    dotted = ".".join((NAME, *relative.removesuffix(".py").split("/")))
    tree = ast.parse(source)
    return Module(PACKAGE / relative, relative, dotted, _layer(relative), tree, 1)


MADE_UP = """
import klein
from klein._resource import KleinResource
from twisted.web._http2 import _END_STREAM_SENTINEL
from rendezvous_twisted.http import site
from ..protocols import msc4108
from rendezvous_twisted.redis.store import RedisStore

errors = app._error_handlers
private = klein.app._routes
plain = request._disconnected
ours = self._not_a_name_of_the_package_or_a_dependency
if isinstance(store, RedisStore):
    pass
"""


def test_each_check_finds_its_fault_in_a_made_up_module() -> None:
    """Each check finds its fault: private names, an upward import, an isinstance on a store."""
    module = _made_up("core/made_up.py", MADE_UP)
    assert {u.name for u in _private_imports(module, "klein")} == {"klein._resource"}
    assert {u.name for u in _private_imports(module, "twisted")} == {
        "twisted.web._http2",
        "_END_STREAM_SENTINEL",
    }
    assert {u.name for u in _reached_through(module, _klein_names(module))} == {"_routes"}
    foreign = {u.name for u in _foreign_attributes(module)}
    assert {"_error_handlers", "_disconnected"} <= foreign
    assert "_not_a_name_of_the_package_or_a_dependency" in foreign
    with pytest.raises(AssertionError, match=r"rendezvous_twisted\.http\.site \(http\)") as up:
        test_imports_run_one_way(module)
    assert "rendezvous_twisted.protocols.msc4108 (protocols)" in str(up.value)
    with pytest.raises(AssertionError, match=r"made_up\.py:13"):
        test_no_isinstance_on_a_store_outside_its_factory(module)
