"""The versioned token dictionary.

Frequent strings (tags, attribute names, common values) travel as one byte,
rarer ones as two.  Each dictionary version *appends* to the one before: a
version-N table is the version N-1 table with new entries at the end, so a
string keeps its code forever and a peer that knows version N decodes every
older version too.  A connection uses the version its client announced in the
preamble; tokens past that version's end are unknown on that connection.

Byte layout of a one-byte token: codes 0x01..0xEB (235 slots) index SINGLE.
Two-byte tokens: a page byte 0xEC..0xEF (4 pages) then an index byte, so
1,024 slots.  Version 0 is the empty dictionary: nodes encoded with it carry
every string literally, which any peer can decode.  The server uses it for
the one error it must send before a dictionary is agreed (an unknown version).

Never reorder, remove or rename an entry: append, and add a version.
docs/PROTOCOL.md carries the whole table; a test keeps the two in step.
"""

from __future__ import annotations

SINGLE_FIRST = 0x01
SINGLE_LAST = 0xEB
DOUBLE_FIRST_PAGE = 0xEC
DOUBLE_PAGES = 4
SINGLE_SLOTS = SINGLE_LAST - SINGLE_FIRST + 1

# Version history: (version, new one-byte tokens, new two-byte tokens).
_HISTORY: list[tuple[int, tuple[str, ...], tuple[str, ...]]] = [
    (
        1,
        (
            # core tags
            "message",
            "ack",
            "receipt",
            "presence",
            "error",
            "ping",
            "pong",
            "register",
            "code",
            "verify",
            "registered",
            "auth",
            "challenge",
            "response",
            "success",
            "close",
            # core attribute names
            "to",
            "from",
            "id",
            "type",
            "t",
            "seq",
            "text",
            "phone",
            "device",
            "class",
            "mech",
            "ttl",
            "last",
            "reason",
            "participant",
            "count",
            "status",
            "name",
            "ver",
            "method",
            # core values
            "delivered",
            "read",
            "played",
            "available",
            "unavailable",
            "SCRAM-SHA-256",
            "sms",
            "voice",
            "media",
            "reaction",
            "edit",
            "revoke",
            "retry",
            # payload kinds a client may name in message/type
            "pkmsg",
            "msg",
            "skmsg",
            "image",
            "video",
            "audio",
            "document",
            "sticker",
            "location",
            "contact",
            "poll",
            "notification",
            # presence, typing, privacy (issue: presence)
            "chatstate",
            "composing",
            "paused",
            "recording",
            "subscribe",
            "unsubscribe",
            "privacy",
            "everyone",
            "contacts",
            "nobody",
            "block",
            "unblock",
            "blocklist",
            "discover",
            "list",
            "item",
            "user",
            "value",
            "setting",
            # keys and groups (reserved for the data model that comes next)
            "keys",
            "identity",
            "prekey",
            "signed",
            "signature",
            "otk",
            "bundle",
            "group",
            "create",
            "add",
            "remove",
            "leave",
            "subject",
            "admin",
            "member",
            "members",
            "creator",
            "creation",
            # operations and session control
            "reconnect",
            "replaced",
            "revoked",
            "logout",
            "delete",
            "timeout",
            "shutdown",
            "ok",
            "get",
            "set",
            "query",
            "result",
            "true",
            "false",
            "on",
            "off",
            "all",
            "none",
            "max",
            "window",
            "limit",
        ),
        (
            "account",
            "backup",
            "broadcast",
            "business",
            "call",
            "offer",
            "accept",
            "reject",
            "terminate",
            "mute",
            "unmute",
            "archive",
            "unarchive",
            "pin",
            "unpin",
            "star",
            "unstar",
            "label",
            "settings",
            "profile",
            "picture",
            "about",
            "pushname",
            "companion",
            "primary",
            "linked",
            "pair",
            "unpair",
            "platform",
            "android",
            "ios",
            "web",
            "desktop",
            "expiration",
            "ephemeral",
            "disappearing",
            "invite",
            "link",
            "description",
            "announcement",
            "restrict",
            "promote",
            "demote",
            "community",
            "newsletter",
            "status_update",
            "view_once",
        ),
    ),
    (
        2,
        (
            # presence privacy and contact discovery (docs/PROTOCOL.md 10b-10e)
            "online",
            "full",
        ),
        (),
    ),
    (
        3,
        (
            # linked devices: pairing, device lists, per-device payloads, sync
            # (docs/PROTOCOL.md 7a, 9)
            "devices",
            "ref",
            "key",
            "unlink",
            "payload",
            "missing",
            "extra",
            "history",
            "sync",
            "qr",
        ),
        (),
    ),
    (
        4,
        (
            # the key directory: uploads, bundles, notices (docs/PROTOCOL.md 9c)
            "fallback",
            "low",
            "changed",
        ),
        (),
    ),
    (
        5,
        (
            # media by link: upload grants (docs/PROTOCOL.md 9b)
            "upload",
            "size",
            "url",
        ),
        (),
    ),
    (
        6,
        (
            # groups: management, notices, invites, group messages (docs/PROTOCOL.md 10g)
            "role",
            "join",
            "announce",
            "approval",
            "failed",
            "by",
            "approve",
            "requests",
            "preview",
            "info",
            "groupadd",
            "requested",
            "body",
        ),
        (),
    ),
]


class Dictionary:
    """One version of the token table, ready for both directions.

    ``single[b]`` is the string of one-byte code ``b`` (None where unused);
    ``double[p][i]`` the string of page ``p`` (0-based) index ``i``.
    ``codes`` maps a string to its code: below 0x100 a one-byte token, else a
    two-byte token whose high byte is the page byte (0xEC + page).
    """

    __slots__ = ("version", "single", "double", "codes")

    def __init__(self, version: int, singles: tuple[str, ...], doubles: tuple[str, ...]):
        if len(singles) > SINGLE_SLOTS:
            raise ValueError("too many one-byte tokens")
        if len(doubles) > 256 * DOUBLE_PAGES:
            raise ValueError("too many two-byte tokens")
        seen = set()
        for s in singles + doubles:
            if s in seen:
                raise ValueError(f"duplicate token {s!r}")
            if not s or len(s.encode()) > 255:
                raise ValueError(f"bad token {s!r}")
            seen.add(s)
        single: list[str | None] = [None] * 256
        codes: dict[str, int] = {}
        for i, s in enumerate(singles):
            single[SINGLE_FIRST + i] = s
            codes[s] = SINGLE_FIRST + i
        double: list[list[str | None]] = [[None] * 256 for _ in range(DOUBLE_PAGES)]
        for i, s in enumerate(doubles):
            page, idx = divmod(i, 256)
            double[page][idx] = s
            codes[s] = ((DOUBLE_FIRST_PAGE + page) << 8) | idx
        self.version = version
        self.single = tuple(single)
        self.double = tuple(tuple(p) for p in double)
        self.codes = codes

    def __repr__(self) -> str:
        return f"<Dictionary v{self.version}: {len(self.codes)} tokens>"

    def entries(self) -> list[tuple[int, str]]:
        """(code, string) pairs in code order, the table as PROTOCOL.md shows it."""
        return sorted((c, s) for s, c in self.codes.items())


def _build(history) -> dict[int, Dictionary]:
    out = {0: Dictionary(0, (), ())}
    singles: tuple[str, ...] = ()
    doubles: tuple[str, ...] = ()
    for version, new_single, new_double in history:
        singles += new_single
        doubles += new_double
        out[version] = Dictionary(version, singles, doubles)
    return out


#: Every dictionary version this build knows, by number (0 = no tokens).
DICTIONARIES: dict[int, Dictionary] = _build(_HISTORY)
LATEST_VERSION: int = max(DICTIONARIES)
LATEST: Dictionary = DICTIONARIES[LATEST_VERSION]
#: The empty dictionary: every string travels literally.
LITERAL: Dictionary = DICTIONARIES[0]


def get_dictionary(version: int) -> Dictionary | None:
    return DICTIONARIES.get(version)
