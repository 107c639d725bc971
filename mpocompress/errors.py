"""Exceptions with the exit codes the CLI maps them to.

Exit codes (documented in docs/cli.md; CI scripts depend on them):

* 0 -- success
* 1 -- internal error (a bug: please report it with ``MPOCOMPRESS_DEBUG=1``)
* 2 -- invalid usage: unknown option, bad value (click's own code)
* 3 -- bad input: missing, corrupt or unsupported checkpoint, nothing to compress
* 4 -- bad output: output exists (without ``--force``), folder missing, would overwrite the input
* 5 -- quality gate failed: ``--max-error`` or ``--min-ratio`` not met (the report is still written)
* 130 -- interrupted (Ctrl-C or SIGTERM); the message says what is on disk
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_GATE = 5
EXIT_INTERRUPTED = 130


class MPOCompressError(Exception):
    """Base class of the errors mpocompress reports as one line."""

    exit_code = EXIT_INTERNAL


class ConfigError(MPOCompressError, ValueError):
    """An invalid configuration value (bond dimension < 1, conflicting options...)."""

    exit_code = EXIT_USAGE


class InputError(MPOCompressError):
    """The input checkpoint is missing, unreadable, corrupt or has nothing to compress."""

    exit_code = EXIT_INPUT


class OutputError(MPOCompressError):
    """The output cannot be written safely."""

    exit_code = EXIT_OUTPUT


class GateError(MPOCompressError):
    """A quality gate (--max-error / --min-ratio) was missed."""

    exit_code = EXIT_GATE


class Interrupted(KeyboardInterrupt):
    """The user interrupted a command; the message says exactly what is on disk.

    A :class:`KeyboardInterrupt` (so ``except Exception`` does not swallow it), raised by the library
    in place of the bare one where it knows what the interrupt left behind.
    """

    exit_code = EXIT_INTERRUPTED
