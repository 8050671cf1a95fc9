"""
Options that tell their mistakes in the user's words.

L{rendezvous_twisted.tap.Options} declares what C{twistd rendezvous}
takes; this is how any mistake in it is told: in one or two lines naming the
option as the user wrote it (C{--ttl 0}, or C{RENDEZVOUS_TTL=0} when the
options came from the environment, L{rendezvous_twisted.ops.environment}),
with a guess at what was meant, and never a traceback nor twistd's whole
help.
"""

from __future__ import annotations

import difflib
import getopt
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.python import usage

from rendezvous_twisted.core.config import is_positive

#: The prefix of the environment variables that the .tac file reads.
ENVIRONMENT_PREFIX = "RENDEZVOUS_"
#: What the usage errors of twistd rendezvous point to.
HELP_HINT = "see: twistd rendezvous --help"
#: Options users reach for to set the port, which --listen does.
PORT_WORDS = frozenset(("port", "p", "host", "bind", "address", "interface", "http-port"))


def number(kind: type[float], text: str) -> float:
    """
    C{text} as a positive finite number of C{kind}; ValueError saying what
    is wrong with it otherwise.
    """
    try:
        value = kind(text)
    except ValueError:
        raise ValueError("not a whole number" if kind is int else "not a number") from None
    if math.isnan(value):
        raise ValueError("not a number")
    if not is_positive(value):
        raise ValueError("must be finite" if math.isinf(value) else "must be more than 0")
    return value


def example(value: Any) -> str:
    """
    A default as an example value: C{60.0} as C{60}.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class WordedOptions(usage.Options):
    """
    C{usage.Options} whose mistakes name the option as the user wrote it.
    """

    #: How the program is named in usage errors ("twistd rendezvous", or the
    #: .tac's name), or None when these options are parsed by a library
    #: caller: then a usage error is raised as UsageError rather than
    #: ending the program.
    program: str | None = None

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        # The opt_* docstrings are the help of their options, and Twisted
        # keeps their line breaks and indentation as runs of spaces.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items() if doc}
        #: The options given, with their values as written (the last one
        #: of a repeated option), for messages.
        self.given: dict[str, str] = {}
        #: Option -> environment variable, when the options came from the
        #: environment (L{rendezvous_twisted.ops.environment}).
        self.variables: dict[str, str] = {}

    # Naming options as the user wrote them.

    def name(self, option: str) -> str:
        """
        C{option} as the user spells it: C{--ttl}, or C{RENDEZVOUS_TTL}.
        """
        return self.variables.get(option, f"--{option}")

    def spelled(self, option: str, value: str | None = None) -> str:
        """
        C{option} with a value as the user would write it: C{--ttl 60}, or
        C{RENDEZVOUS_TTL=60}; with no value, the one given.
        """
        if value is None:
            value = self.given.get(option, "")
        if option in self.variables:
            return f"{self.variables[option]}={value}"
        return f"--{option} {shlex.quote(value)}"

    def usage_error(self, message: str) -> str:
        """
        The whole text of a usage error: the program, the message, and
        where to read more.
        """
        hint = HELP_HINT
        if self.variables:
            hint += f" (each {ENVIRONMENT_PREFIX}NAME variable is the option --name)"
        return f"{self.program}: {message}\n{hint}"

    # Parsing.

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        """
        Parse C{options} (C{sys.argv[1:]} when None).  A mistake raises
        C{UsageError} with a message naming the option as written; when
        run as a program (under twistd, or the .tac through
        L{rendezvous_twisted.tap.environment_service}) it ends the program
        with that message and a pointer to the help instead, since twistd
        would print its whole help before it.
        """
        if self.program is None and self.parent is not None:
            self.program = "twistd rendezvous"
        argv = list(sys.argv[1:] if options is None else options)
        try:
            if "--_shell-completion" not in argv:  # Twisted's own, for shells
                self._read_words(argv)
            super().parseOptions(argv)  # type: ignore[no-untyped-call]
        except usage.UsageError as e:
            # Twisted's words for a coercer's ValueError: the value is what counts.
            message = str(e).removeprefix("Parameter type enforcement failed: ")
            if self.program is None:
                raise usage.UsageError(message) from None
            raise SystemExit(self.usage_error(message)) from None

    def _read_words(self, argv: list[str]) -> None:
        """
        Check the words of the command line as Twisted's parser will read
        them (with getopt), so that a mistake is told in our words: an
        unknown option with a guess at the one meant, an option of twistd
        given after "rendezvous", a missing value.  Remember each value as
        written, for later messages.
        """
        try:
            found, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(self._getopt_message(e)) from None
        for opt, value in found:
            name = opt.lstrip("-")
            self.given[self.synonyms.get(name.replace("-", "_"), name).replace("_", "-")] = value

    def _getopt_message(self, error: getopt.GetoptError) -> str:
        opt = error.opt
        spelled = ("--" if len(opt) > 1 else "-") + opt
        if "not recognized" in error.msg:
            if opt.lower() in PORT_WORDS:
                return (
                    f"no option {spelled}: give the port with --listen, e.g. --listen 9000 "
                    "(on 127.0.0.1) or --listen tcp:9000:interface=0.0.0.0"
                )
            if self.parent is not None and _knows(self.parent, opt):
                value = ""
                if _takes_value(self.parent, opt):
                    value = " VALUE" if len(opt) == 1 else "=VALUE"
                return (
                    f"{spelled} is an option of twistd itself: it goes before 'rendezvous' "
                    f"(twistd {spelled}{value} rendezvous ...)"
                )
            names = sorted({n.rstrip("=") for n in self.longOpt})
            close = difflib.get_close_matches(opt, names, n=1)
            guess = f"; did you mean --{close[0]}?" if close else ""
            return f"no option {spelled}{guess}"
        if "requires argument" in error.msg:
            default = self.defaults.get(opt.replace("-", "_"), self.defaults.get(opt))
            shown = f", e.g. {spelled} {example(default)}" if default is not None else ""
            return f"{spelled} needs a value{shown}"
        if "must not have an argument" in error.msg:
            return f"{spelled} takes no value"
        if "not a unique prefix" in error.msg:
            names = sorted(n.rstrip("=") for n in self.longOpt if n.startswith(opt))
            return f"{spelled} could be any of --{', --'.join(names)}"
        return error.msg

    def check_twistd(self, json_logs: bool) -> None:
        """
        Refuse a log or PID file of twistd's (given before "rendezvous")
        that twistd could not write: it would fail with a traceback once
        it opens them, after these options; and, with C{json_logs}
        (C{--log-format json}), twistd options that would leave them unread.
        """
        parent = self.parent
        if parent is None:
            return
        for option in ("logfile", "pidfile"):
            try:
                path = parent[option]
            except KeyError:
                continue
            if not path or path == "-":
                continue
            if option == "pidfile":
                path = os.path.join(parent.get("rundir") or ".", path)
            problem = _unwritable(Path(path))
            if problem:
                raise usage.UsageError(f"twistd's --{option} {path}: {problem}")
        if json_logs:
            self._check_json_logs(parent)

    def _check_json_logs(self, parent: Any) -> None:
        """
        Refuse JSON logs that would reach nobody: they go to standard
        output, which a daemonized twistd closes, and twistd's --logfile or
        --syslog would be silently left unused.
        """
        json = self.spelled("log-format", "json")
        where = None
        if parent.get("logfile") not in (None, "", "-"):
            where = f"--logfile {parent['logfile']}"
        elif parent.get("syslog"):
            where = "--syslog"
        if where is not None:
            raise usage.UsageError(
                f"{json} writes to standard output, not to twistd's {where}: drop one of them "
                "(journald and log collectors read standard output)"
            )
        if not parent.get("nodaemon"):
            raise usage.UsageError(
                f"{json} writes to standard output, which twistd closes when it daemonizes: "
                "add -n before 'rendezvous' (twistd -n rendezvous ...), or log text to "
                "twistd.log without it"
            )


def _unwritable(path: Path) -> str | None:
    """
    Why C{path} could not be opened for writing, or None.
    """
    if path.is_dir():
        return "is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else "permission denied"
    directory = path.parent
    if not directory.is_dir():
        return f"no such directory: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create a file in {directory}: permission denied"
    return None


def _knows(options: Any, opt: str) -> bool:
    """
    Whether C{options} (twistd's own) has the option C{opt}.
    """
    synonyms = getattr(options, "synonyms", {})
    return opt in synonyms or opt.replace("-", "_") in synonyms


def _takes_value(options: Any, opt: str) -> bool:
    long = options.synonyms.get(opt, options.synonyms.get(opt.replace("-", "_"), opt))
    return f"{long}=" in options.longOpt or f"{long.replace('_', '-')}=" in options.longOpt
