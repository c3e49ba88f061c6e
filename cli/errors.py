"""How ``mor`` reports an exception that escapes a command: one line, never a raw traceback.

* A user error (a bad config, file or value: ``USER_ERRORS``) prints ``error: <message>`` and
  exits 2; the message names the field or file, so no traceback is needed.
* Anything else is a fault of the platform or its environment: ``error: <Type>: <first line>``
  plus where the full traceback was written (a log file under ``log_dir()``); exit 1.
* Ctrl-C exits 130 (the shell's convention for SIGINT) with a short message.
* ``mor --debug`` (or ``MOR_DEBUG=1``) prints the full traceback instead.

Every message and log goes through ``core.endpoints.redact``: a ``user:password@`` in a URL
(e.g. a tracking URI) never reaches the terminal or the log.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
LOG_DIR_ENV = "MOR_LOG_DIR"
DEBUG_ENV = "MOR_DEBUG"


def _user_error_types() -> tuple[type[BaseException], ...]:
    """ValueError covers ConfigError, pydantic's ValidationError, UnicodeDecodeError and
    json.JSONDecodeError; the OSErrors are a path the user gave that cannot be read."""
    types: list[type[BaseException]] = [
        ValueError,
        json.JSONDecodeError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    ]
    try:
        import yaml

        types.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - yaml is a dependency
        pass
    return tuple(types)


USER_ERRORS = _user_error_types()


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _redact(text: str) -> str:
    from core.endpoints import redact

    return redact(text)


def log_dir() -> Path:
    """$MOR_LOG_DIR, else $XDG_CACHE_HOME/mor-platform/logs (default ~/.cache/...)."""
    explicit = os.environ.get(LOG_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "mor-platform" / "logs"


def write_log(text: str) -> Path | None:
    """Write ``text`` to a new log file; the system temp dir if the log dir is not writable.
    None if neither is (the caller then prints the traceback)."""
    name = f"mor-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "mor-platform-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def report(exc: BaseException, argv: list[str], debug: bool = False) -> int:
    """Print ``exc`` as described in the module docstring; returns the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    user = isinstance(exc, USER_ERRORS)
    code = EXIT_USAGE if user else EXIT_FAILURE
    tb = _redact("".join(traceback.format_exception(exc)))
    if debug:
        print(tb, end="", file=sys.stderr)
        return code
    if user:
        print(f"error: {_redact(str(exc).strip())}", file=sys.stderr)
        return code
    first = _redact(_first_line(exc))
    name = type(exc).__name__
    print(f"error: {name}: {first}" if first else f"error: {name}", file=sys.stderr)
    header = f"mor {_redact(' '.join(argv))}\n{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n\n"
    path = write_log(header + tb)
    if path is None:
        print(tb, end="", file=sys.stderr)
    else:
        print(
            f"full traceback in {path} (rerun with `mor --debug ...` to print it)", file=sys.stderr
        )
    return code
