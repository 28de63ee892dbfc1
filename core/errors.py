"""Protocol errors and their stable numeric codes.

Every error the server puts on the wire is an ``error`` node carrying one of
the codes below and a human-readable text (docs/PROTOCOL.md lists them).  The
codes are part of the contract: never renumber, only append.

Exceptions say *what* was violated (the code and text) and whether the
connection can go on (``fatal``).  Framing and codec errors are fatal: after a
malformed frame the byte stream cannot be trusted.  Errors about a well-formed
node (unknown tag, missing attribute, wrong state) are not: the peer gets an
error node and the connection carries on.

``RemoteProtocolError`` means the peer broke the protocol; ``LocalProtocolError``
means this side tried to (a bug in the caller, never the peer's fault).
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    # 1xx: connection, framing and encoding. Always fatal: the sender closes.
    BAD_PREAMBLE = 100
    UNSUPPORTED_PROTOCOL = 101
    UNSUPPORTED_DICTIONARY = 102
    FRAME_TOO_LARGE = 110
    EMPTY_FRAME = 111
    MALFORMED_NODE = 120
    UNKNOWN_TOKEN = 121
    LIMIT_EXCEEDED = 122
    TIMEOUT = 130
    # 2xx: a well-formed node the receiver cannot act on. The connection goes on.
    BAD_REQUEST = 200
    UNKNOWN_NODE = 201
    WRONG_STATE = 202
    # 3xx: registration, login and account.
    NOT_AUTHORIZED = 300
    BAD_CODE = 301
    RATE_LIMITED = 302
    REPLACED = 303
    REVOKED = 304
    PAIR_UNKNOWN = 305
    PAIR_EXPIRED = 306
    PAIR_USED = 307
    KEY_MISMATCH = 308
    BAD_SIGNATURE = 309
    DEVICE_LIMIT = 310
    NOT_PRIMARY = 311
    KEY_SIGNATURE = 312
    KEYS_FULL = 313
    # 4xx: delivery.
    UNKNOWN_RECIPIENT = 400
    NO_DEVICE = 401
    QUEUE_FULL = 402
    BLOCKED = 403
    NEW_CHAT_LIMIT = 404
    TOO_FAST = 405
    TOO_MANY = 406
    ID_REUSED = 407
    STALE_DEVICES = 408
    # 42x: media uploads (docs/PROTOCOL.md 9b).
    MEDIA_TOO_LARGE = 420
    MEDIA_QUOTA = 421
    # 43x: groups (docs/PROTOCOL.md 10g).
    NOT_MEMBER = 430
    NOT_ADMIN = 431
    GROUP_FULL = 432
    ADD_REFUSED = 433
    ALREADY_MEMBER = 434
    BAD_INVITE = 435
    ANNOUNCE_ONLY = 436
    TOO_MANY_GROUPS = 437
    STRANGER_GROUPS = 438
    # 5xx: the server's side.
    INTERNAL = 500
    STORE_FULL = 501
    UNAVAILABLE = 502
    SHUTTING_DOWN = 503


#: Codes after which the sender of the error closes the connection.
FATAL_CODES = frozenset(
    {
        ErrorCode.BAD_PREAMBLE,
        ErrorCode.UNSUPPORTED_PROTOCOL,
        ErrorCode.UNSUPPORTED_DICTIONARY,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.EMPTY_FRAME,
        ErrorCode.MALFORMED_NODE,
        ErrorCode.UNKNOWN_TOKEN,
        ErrorCode.LIMIT_EXCEEDED,
        ErrorCode.TIMEOUT,
        ErrorCode.NOT_AUTHORIZED,
        ErrorCode.REPLACED,
        ErrorCode.REVOKED,
        ErrorCode.INTERNAL,
        ErrorCode.SHUTTING_DOWN,
    }
)


def is_fatal(code: int) -> bool:
    return code in FATAL_CODES


class ProtocolError(Exception):
    """Base class: ``code`` (an ErrorCode), ``text``, ``fatal``."""

    code: ErrorCode = ErrorCode.BAD_REQUEST

    def __init__(self, text: str, code: int | None = None, *, request_id: str | None = None):
        super().__init__(text)
        if code is not None:
            self.code = ErrorCode(code)
        self.text = text
        #: the ``id`` of the request that caused the error, when known
        self.request_id = request_id

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value} {self.code.name}: {self.text!r})"


class CodecError(ProtocolError):
    """Raised by the framing and node codec (either implementation)."""

    code = ErrorCode.MALFORMED_NODE


class FrameTooLarge(CodecError):
    code = ErrorCode.FRAME_TOO_LARGE


class EmptyFrame(CodecError):
    code = ErrorCode.EMPTY_FRAME


class MalformedNode(CodecError):
    code = ErrorCode.MALFORMED_NODE


class UnknownToken(CodecError):
    code = ErrorCode.UNKNOWN_TOKEN


class LimitExceeded(CodecError):
    code = ErrorCode.LIMIT_EXCEEDED


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids."""
