"""sd_notify: tell systemd (Type=notify) that the server is ready or stopping.

The protocol is one datagram of "KEY=VALUE" lines to the Unix socket named
by $NOTIFY_SOCKET (a path, or an abstract name written with a leading "@").
No library is needed for that, and where no service manager set the
variable (FreeBSD, a terminal, tests) ``notify`` does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger("pigeon.supervisor")


def notify(**fields) -> bool:
    """Send fields (``ready=1`` becomes ``READY=1``); True if a manager was told."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target or not hasattr(socket, "AF_UNIX"):
        return False
    if target.startswith("@"):
        target = "\0" + target[1:]
    message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(target)
            s.sendall(message)
    except OSError as exc:
        logger.warning("sd_notify to %s failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True
