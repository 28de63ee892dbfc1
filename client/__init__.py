"""pigeon.client: the SDK.  ``pigeon.client.aio`` drives the sans-IO core with asyncio.

The SDK never imports server code.
"""

from .aio import Client, Credentials, ServerError

__all__ = ["Client", "Credentials", "ServerError"]
