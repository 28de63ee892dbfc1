"""pigeon.client: the SDK.

``pigeon.client.aio.Client`` drives the sans-IO core with asyncio,
``pigeon.client.trio.Client`` with trio; both share ``pigeon.client._core``
(request bookkeeping, SCRAM, redelivery filtering, resume).  The SDK never
imports server code.
"""

from ._core import ConnectionLost, Credentials, ServerError, StaleDevices
from .aio import Client

__all__ = ["Client", "ConnectionLost", "Credentials", "ServerError", "StaleDevices"]
