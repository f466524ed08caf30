"""What every command-line tool shares: argument types that refuse nonsense, and one way to end.

    if __name__ == "__main__":
        run_cli(main)

A user error (bad input, a missing or unreadable file, a full disk, a bad setting) ends in ONE
line on stderr, ``error: ...``, and exit code ``EXIT_USER_ERROR``; anything else is a bug and
keeps its traceback. ``REASONEMBED_TRACEBACK=1`` shows the traceback of user errors too.

Exit codes (documented in the README and the launch scripts):

    0   done
    1   a bug (a traceback is printed)
    2   a user error: bad flag, setting, input file, or the environment (disk full, ...)
    75  preempted (SIGTERM): a checkpoint was saved; requeue the same command to resume
        (EX_TEMPFAIL from sysexits.h)
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable, Sequence

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
# OS errors that are the environment's fault, not a bug: said in one line with the path.
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT,
                  errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG}


class UserError(Exception):
    """Bad input or settings: reported as one line, no traceback."""


class Preempted(Exception):  # noqa: N818 (a state, not a failure)
    """The run stopped on SIGTERM after saving a checkpoint; exit ``EXIT_PREEMPTED``."""


def _number(kind: type, low: float, strict: bool) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got '{text}'") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got '{text}'")
        return value

    parse.__name__ = f"{kind.__name__}{'>' if strict else '>='}{low:g}"
    return parse


positive_int = _number(int, 0, strict=True)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0, strict=True)
non_negative_float = _number(float, 0, strict=False)


def user_error_message(err: BaseException) -> str | None:
    """The one-line message of a user error, or None when ``err`` looks like a bug."""
    if isinstance(err, UserError | ValueError | FileNotFoundError | NotADirectoryError
                  | IsADirectoryError | PermissionError):
        text = str(err).strip() or type(err).__name__
    elif isinstance(err, OSError) and err.errno in USER_OS_ERRORS:
        text = f"{err.strerror or err}"
        if err.filename:
            text += f": {err.filename}"
    else:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError) and cause.errno in USER_OS_ERRORS:
            return user_error_message(cause)  # e.g. a writer library wrapping "disk full"
        return None
    if isinstance(err, OSError) and err.filename and err.filename not in text:
        text += f": {err.filename}"
    return " ".join(text.split("\n")[0].split())


def run_cli(main: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> None:
    """Runs ``main(argv)`` and exits: 0, its return code, ``EXIT_PREEMPTED``, or one line and
    ``EXIT_USER_ERROR`` for a user error. Bugs keep their traceback (exit 1)."""
    try:
        code = main(argv)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 (sorted into user errors and bugs right here)
        message = user_error_message(err)
        if message is None or os.environ.get("REASONEMBED_TRACEBACK"):
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code or 0)
