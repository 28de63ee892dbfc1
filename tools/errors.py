"""How ``pigeon`` commands fail: one prefix, two exit statuses.

A command raises ``UsageError`` for a mistake in what it was given (a bad
argument, a bad config file: fix the command line and run it again) and
``Failure`` when it could not do its work (the server is unreachable, the
store is missing or unreadable, a file cannot be written).  ``main`` in
tools/cli.py prints either as one line on stderr, prefixed with the command
as typed down to its action (``pigeon admin user show: no account ...``),
and exits 2 for a usage error, 1 for a failure.  argparse's own errors
(unknown flag, missing argument) exit 2 too, with the same prefix followed
by ``error:``.  docs/OPERATIONS.md ("Admin commands") documents the scheme.
"""

from __future__ import annotations

USAGE = 2
FAILURE = 1


class UsageError(Exception):
    """A mistake on the command line or in the config file: exit status 2."""


class Failure(Exception):
    """The command could not do its work (server unreachable, store missing): exit status 1."""


def command_name(args) -> str:
    """``pigeon admin user show`` for the parsed ``args`` of that command."""
    parts = ["pigeon", getattr(args, "command", None)]
    for attr in ("admin_command", "user_command", "device_command", "chat_command",
                 "bench_command"):  # fmt: skip
        value = getattr(args, attr, None)
        if value:
            parts.append(value)
    return " ".join(p for p in parts if p)
