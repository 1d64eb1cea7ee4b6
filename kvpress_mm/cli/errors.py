"""How the `kvpress-mm` command stops: the one place that prints its error line and picks the exit status.

    fail(err)       "kvpress-mm: error: <one line>" on stderr, exit 2 (a bad command line or config value)
    interrupted()   Ctrl-C: "kvpress-mm: interrupted; results so far in <dir>", exit 130, after the hooks
                    registered with on_interrupt (e.g. the sweep summary) have saved what was done

Every check of the command line (cli.preflight), of a command's settings (cli.bench) and of a run's
options (cli.run) raises ConfigError or ValueError and ends here; none prints a traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PROG = "kvpress-mm"
EXIT_USAGE = 2  # a bad value: nothing ran
EXIT_FAILED = 1  # something ran and failed (e.g. a sweep point)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ConfigError(ValueError):
    """A bad config value; str() is the one line the CLI prints (naming the key and what is allowed)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


def one_line(text: object) -> str:
    """`text` on one line: its non-empty lines joined (Hydra and OmegaConf put hints on further lines)."""
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def error_line(err: BaseException) -> str:
    """The one-line text of an error from inside a run: "<Type>: <message>" (ConfigError: the message)."""
    if isinstance(err, ConfigError):
        return one_line(err)
    message = one_line(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def fail(err: object, code: int = EXIT_USAGE) -> NoReturn:
    """Print "kvpress-mm: error: <err on one line>" to stderr and exit with `code` (2: a bad value)."""
    print(f"{PROG}: error: {one_line(err)}", file=sys.stderr, flush=True)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------- interrupts

_results: dict = {"dir": None, "file": None}
_hooks: list[Callable[[], None]] = []


def results_in(path: str | Path | None, file: str | None = None) -> None:
    """Where this command keeps its results (named by the interrupt line): a run's or a sweep's directory;
    with `file`, only once <path>/<file> exists (before that, the line says nothing was saved)."""
    _results.update(dir=None if path is None else str(path), file=file)


def on_interrupt(hook: Callable[[], None]) -> None:
    """Call `hook` (save what was done) when the command is interrupted; hooks run once, newest first."""
    _hooks.append(hook)


def reset() -> None:
    """Forget the results directory and hooks (the CLI calls it before each command)."""
    results_in(None)
    _hooks.clear()


def interrupted() -> NoReturn:
    """After a KeyboardInterrupt: run the hooks (a second Ctrl-C meanwhile is ignored), print one line, exit 130."""
    masked = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if masked else None
    try:
        while _hooks:
            hook = _hooks.pop()
            try:
                hook()
            except Exception as err:  # saving must not turn the interrupt into a traceback
                print(f"{PROG}: while saving after the interrupt: {error_line(err)}", file=sys.stderr, flush=True)
    finally:
        if masked:
            signal.signal(signal.SIGINT, previous)
    folder, file = _results["dir"], _results["file"]
    saved = folder is not None and (file is None or (Path(folder) / file).exists())
    where = f"results so far in {folder}" if saved else "nothing was saved"
    print(f"{PROG}: interrupted; {where}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_INTERRUPTED)
