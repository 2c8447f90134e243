"""One user-error type, and how every entry point reports it.

``UserError`` is what bad input raises (a config, a data source, a checkpoint, a command line):
its message names the key, file or line and says how to fix it. ``ConfigError``, ``DataConfigError``,
``ReshardError``, ``ExportError``, ``HFImportError`` and the checkpoint errors derive from it.

Every entry point (train, data, export, import_hf, generate, reshard, launch, bench) runs its body
under ``user_errors``: a ``UserError`` becomes ``<prog>: error: <message>`` on stderr and exit code 2,
with no traceback. ``--debug`` on the command line or ``HYDRA_FULL_ERROR=1`` in the environment
re-raises it with its traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from typing import Iterator, Optional

EXIT_USER_ERROR = 2
DEBUG_ENV = "HYDRA_FULL_ERROR"


class UserError(ValueError):
    """Bad input; the message names what is wrong and the fix."""


class CheckpointError(UserError):
    """A checkpoint that cannot be trusted or read: damaged, truncated, or holding code."""


def debugging(argv: Optional[list[str]] = None, debug: Optional[bool] = None) -> bool:
    """True when the user asked for tracebacks: HYDRA_FULL_ERROR=1, or else ``debug`` (a parsed
    ``--debug`` flag) when given, or else ``--debug`` in ``argv`` (default: sys.argv)."""
    if os.environ.get(DEBUG_ENV) == "1":
        return True
    if debug is not None:
        return debug
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def report(prog: str, err: BaseException) -> None:
    """Print a user error the way every entry point does, on stderr and in the log."""
    message = f"{prog}: error: {err}"
    print(message, file=sys.stderr, flush=True)
    logging.getLogger("pretrain").debug("%s", message)


@contextlib.contextmanager
def user_errors(prog: str, argv: Optional[list[str]] = None, *, debug: Optional[bool] = None) -> Iterator[None]:
    """Turn a UserError raised inside into exit code 2 and a one-paragraph message.

    An entry point that parses its own ``--debug`` passes ``debug=args.debug``; otherwise ``--debug`` is
    looked for in ``argv`` (default: sys.argv).
    """
    try:
        yield
    except UserError as err:
        if debugging(argv, debug):
            raise
        report(prog, err)
        sys.exit(EXIT_USER_ERROR)


@contextlib.contextmanager
def composing(what: str) -> Iterator[None]:
    """Hydra's compose API raises on an unknown key, a wrong type or a missing group option: a UserError."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        yield
    except (HydraException, OmegaConfBaseException) as err:
        raise UserError(f"{what}: {err}".rstrip()) from err


class HydraEntry:
    """Exit codes for a ``@hydra.main`` entry point, the same as for every other one.

    Hydra reports a config it cannot compose (an unknown key, a value of the wrong type, a missing
    group option) with its message and no traceback, but exits 1, as it does for a crash inside the
    job. ``run`` tells them apart: an exit 1 before the task function started is bad input (exit 2);
    a UserError inside the task is reported by ``user_errors``.

        entry = HydraEntry("train")

        @hydra.main(...)
        @entry.task
        def _main(cfg): ...

        def main(): entry.run(_main)
    """

    def __init__(self, prog: str):
        self.prog = prog
        self.started = False

    def task(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            self.started = True
            with user_errors(self.prog):
                return fn(*args, **kwargs)

        return wrapped

    def run(self, hydra_main) -> None:
        try:
            hydra_main()
        except SystemExit as exit_:
            if exit_.code == 1 and not self.started:
                print(f"{self.prog}: error: the configuration could not be composed (see above); fix the "
                      "override it names (--help lists the config groups and their options)", file=sys.stderr)
                sys.exit(EXIT_USER_ERROR)
            raise
