"""
Options from environment variables, for the C{.tac} file: one variable per
option, C{--max-bytes} as C{RENDEZVOUS_MAX_BYTES}, whoever declared the
option and however.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from twisted.python import usage

from rendezvous_twisted.ops.options import ENVIRONMENT_PREFIX, PORT_WORDS, WordedOptions

OptionsT = TypeVar("OptionsT", bound=WordedOptions)


@dataclasses.dataclass(frozen=True)
class Setting:
    """
    One option as users set it: on the command line, or through its
    environment variable for the .tac.
    """

    #: The option's long name, without dashes.
    option: str
    #: The .tac's environment variable.
    variable: str
    #: Whether it takes a value (else it is a flag).
    takes_value: bool
    #: Whether it may be given more than once (the variable then holds
    #: several values, separated by spaces).
    repeatable: bool
    #: What an empty command line gives it.
    default: Any


def settings(kind: type[WordedOptions]) -> list[Setting]:
    """
    Every option of the options C{kind}, whoever declared it and however (a
    parameter, a flag, an C{opt_} method), but C{--help} and C{--version}.
    """
    blank = kind()
    effective = kind()
    effective.parseOptions([])
    found = []
    for long in blank.longOpt:
        option = long.rstrip("=")
        if option in ("help", "version"):
            continue
        key = blank.synonyms.get(option.replace("-", "_"), option)
        key = key if key in effective else option
        found.append(
            Setting(
                option=option,
                variable=ENVIRONMENT_PREFIX + option.upper().replace("-", "_"),
                takes_value=long.endswith("="),
                repeatable=isinstance(blank.get(key), list),
                default=effective.get(key),
            )
        )
    return found


def options_from_environment(
    kind: type[OptionsT], environ: Mapping[str, str], program: str | None = None
) -> OptionsT:
    """
    Parse options C{kind} from C{RENDEZVOUS_*} environment variables, one
    per option (L{settings}): C{--max-bytes} is C{RENDEZVOUS_MAX_BYTES}, a
    repeatable option's variable holds its values separated by spaces
    (C{RENDEZVOUS_LISTEN}, C{RENDEZVOUS_TRUSTED_PROXY}...), and a flag's is
    1 or 0.  A C{RENDEZVOUS_*} variable that is no option's is refused
    (a typo would otherwise be silently ignored).  Mistakes name the
    variable; with a C{program} they end it (see
    L{WordedOptions.parseOptions}).
    """
    options = kind()
    options.program = program
    known = {s.variable: s for s in settings(kind)}
    options.variables = {s.option: s.variable for s in known.values()}
    argv: list[str] = []
    try:
        for variable in sorted(environ):
            if not variable.startswith(ENVIRONMENT_PREFIX):
                continue
            value = environ[variable]
            setting = known.get(variable)
            if setting is None:
                close = difflib.get_close_matches(variable, list(known), n=1)
                guess = f"; did you mean {close[0]}?" if close else ""
                word = variable.removeprefix(ENVIRONMENT_PREFIX).lower().replace("_", "-")
                if word in PORT_WORDS:
                    listen = f"{ENVIRONMENT_PREFIX}LISTEN"
                    guess = (
                        f": give the port with {listen}, e.g. {listen}=9000 (on 127.0.0.1) "
                        f"or {listen}=tcp:9000:interface=0.0.0.0"
                    )
                raise usage.UsageError(f"{variable}={value}: no such setting{guess}")
            if not setting.takes_value:
                if value.lower() in ("1", "true", "yes"):
                    argv.append(f"--{setting.option}")
                elif value.lower() not in ("", "0", "false", "no"):
                    raise usage.UsageError(f"{variable}={value}: must be 1 or 0")
                continue
            for one in value.split() if setting.repeatable else [value]:
                argv.append(f"--{setting.option}={one}")
    except usage.UsageError as e:
        if program is None:
            raise
        raise SystemExit(options.usage_error(str(e))) from None
    options.parseOptions(argv)
    return options
