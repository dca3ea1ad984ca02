"""What every script runs under `if __name__ == "__main__"`: its flags parsed, its errors said in one line.

The library's errors name Python parameters (`r=0: must be at least 1`); a script knows which flag a value came
from and says that instead (`--lora_r 0: must be at least 1`), with `check_flag` for its own flags and
`config_flags` for the library's configs it builds from flags.
"""

import difflib
import inspect
import os
import re
import signal
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

from lit_lora.model import ConfigError


def check_flag(args: Any, name: str, ok: bool, requirement: str) -> None:
    """Refuse the value of flag `name` unless `ok`, with a message naming the flag, its value and `requirement`.

    Each script's dataclass of flags calls this in `__post_init__`, so a bad value stops the script while its
    arguments are parsed, before anything is read or written."""
    if not ok:
        raise ValueError(f"--{name} {getattr(args, name)}: {requirement}")


@contextmanager
def config_flags(**flag_of_field: str) -> Iterator[None]:
    """Around building a library config from flags: its ConfigError, which names a field, names the flag instead
    (config_flags(r="lora_r"): `r=0: ...` becomes `--lora_r 0: ...`)."""
    try:
        yield
    except ConfigError as error:
        flag = flag_of_field.get(error.field, error.field)
        raise ValueError(f"--{flag} {error.value}: {error.requirement}") from None


# What a user can fix: a bad flag, a missing, damaged or mismatched file, a missing optional package.
USER_ERRORS = (ValueError, OSError, ImportError, FloatingPointError)


def cli(main: Callable, flags: Optional[type] = None) -> Any:
    """Parse the command line with jsonargparse (`--help` lists each flag with its default) and call `main`, with
    the parsed dataclass `flags`, or, without `flags`, with main's own arguments as the flags.

    Errors a user can fix end in one line on stderr, `error: ...`, not in a traceback: exit code 2 for a flag
    value refused while parsing, 1 for a problem found later (a missing or damaged file, a mismatch). Ctrl-C
    ends with exit code 130; after `main` has returned it is ignored. Set LIT_LORA_TRACEBACK=1 to see the traceback of
    any of them.
    """
    from jsonargparse import (
        CLI,  # here, so that importing lit_lora.cli stays light
        ArgumentError,
    )

    def fail(error: BaseException, code: int):
        if os.environ.get("LIT_LORA_TRACEBACK"):
            raise error
        print(f"error: {error}", file=sys.stderr)
        sys.exit(code)

    try:
        # allow_abbrev=False: `--max_step 10` is refused, not silently taken as --max_steps
        if flags is None:
            result = CLI(main, as_positional=False, exit_on_error=False, allow_abbrev=False)
        else:
            try:
                args = CLI(flags, as_positional=False, exit_on_error=False, allow_abbrev=False)
            except ValueError as error:  # refused by the dataclass's __post_init__ (check_flag)
                fail(error, 2)
            result = main(args)
        # Done, and every file written whole: a Ctrl-C while Python shuts down (joining threads) changes nothing, and
        # would only end in a traceback or in death by the signal. Ignored from here; the exit code stays 0.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return result
    except ArgumentError as error:  # a flag the parser refused: unknown, missing its value, of the wrong type
        known = flags.__dataclass_fields__ if flags is not None else inspect.signature(main).parameters
        fail(ValueError(f"{parse_error_line(str(error), known)} (--help lists every flag)"), 2)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as error:
        fail(error, 1)


# How jsonargparse names the types it expected, said as a user would
TYPE_WORDS = {"<class 'int'>": "a whole number", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
              "<class 'NoneType'>": "null", "<class 'str'>": "text", "<class 'pathlib.Path'>": "a path"}


def parse_error_line(message: str, known_flags: Iterable[str] = ()) -> str:
    """jsonargparse's error about a flag's value (several lines: the key, the types it tried, the value) as one
    line: `--max_seq_length abc: expected a whole number or null`. An unknown flag names the known one it is closest
    to. Other errors: their lines joined."""
    unknown = re.match(r"unrecognized arguments: (.*)", message.strip())
    if unknown:
        words = [w for w in unknown.group(1).split() if w.startswith("--")]
        close = [difflib.get_close_matches(w[2:].split("=")[0], list(known_flags), n=1) for w in words]
        hints = [f"--{match[0]}" for match in close if match]
        return f"unknown flag(s): {' '.join(words) or unknown.group(1)}" + (
            f" (did you mean {', '.join(hints)}?)" if hints else "")
    key, value = re.search(r'Parser key "([\w.]+)"', message), re.search(r"(?:Given|Got) value: (.*)", message)
    expected = re.findall(r"Expected an? (.*?)(?:\. Got value: .*)?$", message, flags=re.MULTILINE)
    if not (key and value and expected):
        return " ".join(line.strip() for line in message.splitlines() if line.strip())
    words = [TYPE_WORDS.get(kind.strip(), kind.strip()) for kind in expected]
    words = ["one of " + ", ".join(re.findall(r"'([^']*)'", w)) if w.startswith("typing.Literal") else w for w in words]
    return f"--{key.group(1)} {value.group(1).strip()}: expected {' or '.join(dict.fromkeys(words))}"
