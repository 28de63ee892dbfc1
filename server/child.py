"""The start of every process the supervisor runs (the workers, the media service).

The supervisor starts each child with the same arguments (its index, the
count, the reload generation, the run directory and three inherited file
descriptors) and writes its settings to the ``--config-fd`` pipe, never to
argv, which any local user can read.  With the settings comes what the
supervisor itself runs: the file of its worker module and its codec.  A
child that imported other code (a ``pigeon/`` folder on the Python path
shadowing the installed package, or the other codec) says so on its status
pipe and refuses to start: restarting it would not help, so the supervisor
stops.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

import orjson

from pigeon.core import codec as core_codec

from . import log
from .config import Config, load

__all__ = ["code_mismatch", "start"]

logger = logging.getLogger("pigeon.server")

#: The worker module of this package (the supervisor names its own).
_WORKER_FILE = os.path.join(os.path.dirname(os.path.realpath(__file__)), "worker.py")


def code_mismatch(expected: dict) -> str | None:
    """Why this process is not running the code its supervisor runs, or None."""
    if expected.get("worker") not in (None, _WORKER_FILE):
        return (
            f"this process runs {_WORKER_FILE} but the supervisor runs {expected['worker']}: "
            "a pigeon/ folder on the Python path shadows the installed package"
        )
    if expected.get("codec") not in (None, core_codec.IMPLEMENTATION):
        return (
            f"this process loaded the {core_codec.IMPLEMENTATION} codec but the supervisor "
            f"the {expected['codec']} one"
        )
    return None


def start(prog: str, description: str, argv=None) -> tuple[argparse.Namespace, Config] | int:
    """Parse the child's arguments, read its settings, set up logging and SIGINT.

    Returns (arguments, settings), or the exit status when the child must not
    run (its code is not the supervisor's)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--gen", type=int, default=0, help="reload generation")
    p.add_argument("--run-dir", required=True)
    p.add_argument(
        "--config-fd",
        type=int,
        required=True,
        help="a pipe the supervisor writes the settings to (JSON), read once at start",
    )
    p.add_argument("--parent-fd", type=int)
    p.add_argument("--status-fd", type=int)
    args = p.parse_args(argv)
    with open(args.config_fd, "rb") as f:  # the settings never appear in argv (ps)
        private = orjson.loads(f.read())
    config = load(overrides=private["config"])
    log.setup(config.log_level, config.log_format)
    problem = code_mismatch(private.get("code") or {})
    if problem:
        log.event(logger, logging.ERROR, f"{prog} refuses to start", error=problem)
        if args.status_fd is not None:
            os.write(args.status_fd, f"fatal {problem}\n".encode())
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    return args, config
