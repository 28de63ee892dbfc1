"""The one exception the server's services raise for a request they refuse."""

from __future__ import annotations

from pigeon.core.errors import ErrorCode


class ServiceError(Exception):
    """A request the server refuses, with the error code to send back."""

    def __init__(self, code: ErrorCode, text: str):
        super().__init__(text)
        self.code = code
        self.text = text
