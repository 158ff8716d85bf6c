"""The one error path of every command and tool: an expected failure is one line naming the
file, key or value and what to do, exit 2; an OS error on a path the user named is one line
naming the path; anything else is a bug, and its last line says so."""
from __future__ import annotations

import errno
import sys
from collections.abc import Callable

from powergrad import __version__

BAD_INPUT = 2


def one_line(err: BaseException) -> str:
    """An exception's message on one line (library messages often span several)."""
    return " ".join(str(err).split())


def os_error_line(err: OSError) -> str:
    """'PATH: what went wrong; what to do' for an OSError from a path."""
    where = f"{err.filename}: " if err.filename else ""
    what = err.strerror or " ".join(str(err).split())
    fix = {errno.ENOSPC: "free space there or choose another place",
           errno.EDQUOT: "free space there or choose another place",
           errno.EACCES: "choose a place you can write to, or change its permissions",
           errno.EROFS: "the file system is read-only: choose another place",
           errno.ENOTDIR: "a part of this path is a file, not a folder",
           errno.EISDIR: "this is a folder; name a file",
           errno.EEXIST: "a file is in the way where a folder is needed",
           errno.ENOENT: "no such file or folder"}.get(err.errno)
    return f"{where}{what}" + (f"; {fix}" if fix and fix != what.lower() else "")


def one_error_path(name: str, run: Callable[[], int | None],
                   expected: tuple[type[BaseException], ...] = ()) -> int:
    """run()'s exit code (None: 0). `expected` errors and OS errors print one line
    '<name>: ...' and give 2; KeyboardInterrupt gives 130; any other exception is a bug: its
    traceback, then a line saying it is one and what to report, and 1."""
    try:
        code = run()
        return 0 if code is None else code
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except expected as err:  # its own words: one line, or a list of what is off
        print(f"{name}: {err}", file=sys.stderr)
        return BAD_INPUT
    except OSError as err:  # a full disk, a read-only or missing folder, a file for a folder
        print(f"{name}: {os_error_line(err)}", file=sys.stderr)
        return BAD_INPUT
    except Exception:
        import traceback

        traceback.print_exc()
        print(f"{name}: this is a bug in powergrad {__version__}, not in your input: please "
              "report it with the command line and the traceback above", file=sys.stderr)
        return 1
