"""Generated sections of docs/PROTOCOL.md: the token table and the hex examples.

The prose of PROTOCOL.md is written by hand; the parts that must match the
code byte for byte are generated between markers

    <!-- BEGIN tokens -->            ...  <!-- END tokens -->
    <!-- BEGIN example NAME -->      ...  <!-- END example NAME -->

``python -m pigeon.tools.protodoc docs/PROTOCOL.md`` rewrites them in place;
``--check`` exits 1 if the file is out of date (the test suite runs that).
Examples are encoded with the newest dictionary by the pure-Python codec.
"""

from __future__ import annotations

import re
import sys

from pigeon.core import _pycodec
from pigeon.core.errors import ErrorCode
from pigeon.core.events import (
    AuthChallenge,
    AuthResponse,
    AuthStart,
    AuthSuccess,
    Block,
    Blocklist,
    BlocklistQuery,
    ChatState,
    CodeSent,
    DeleteAccount,
    DeviceAck,
    Discover,
    DiscoverResult,
    Error,
    IncomingChatState,
    IncomingMessage,
    IncomingReceipt,
    Logout,
    Message,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Privacy,
    PrivacySettings,
    Receipt,
    Register,
    Registered,
    ServerAck,
    Unblock,
    Verify,
)
from pigeon.core.node import format_node
from pigeon.core.tokens import DICTIONARIES, LATEST
from pigeon.core.wire import preamble

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"
T = 1763830000123
BODY = bytes.fromhex("33088a1b2c3d4e5f60718293a4b5c6d7")  # stands in for ciphertext
NONCE = "rOprNGfwEbeRWgbNEkqO"
SNONCE = NONCE + "ZtUcCsQ1lfW1UMRv"

EXAMPLES = {
    "register": Register("r1", ALICE),
    "code": CodeSent("r1", 300),
    "verify": Verify("r2", ALICE, "123456", bytes(range(32))),
    "registered": Registered("r2", ALICE + ":0", bytes(range(32, 64))),
    "auth": AuthStart(f"n,,n={ALICE}:0,r={NONCE}".encode()),
    "challenge": AuthChallenge(f"r={SNONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096".encode()),
    "response": AuthResponse(
        f"c=biws,r={SNONCE},p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=".encode()
    ),
    "success": AuthSuccess(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=", T),
    "message-out": Message(BOB, "3eb0c1f2a4d5e6f7", "text", BODY),
    "message-typical": Message(BOB, "3eb0c1f2a4d5e6f7", "text", bytes(100)),
    "message-in": IncomingMessage(ALICE + ":0", "3eb0c1f2a4d5e6f7", "text", T, 1, BODY),
    "ack-server": ServerAck("3eb0c1f2a4d5e6f7", T),
    "ack-device": DeviceAck(1),
    "receipt-out": Receipt(ALICE, "3eb0c1f2a4d5e6f7", "read"),
    "receipt-in": IncomingReceipt(BOB, "3eb0c1f2a4d5e6f7", "delivered", T + 250, 2),
    "presence-out": Presence("available"),
    "presence-subscribe": Presence("subscribe", BOB),
    "presence-unsubscribe": Presence("unsubscribe", BOB),
    "presence-in": PresenceUpdate(BOB, "unavailable", T - 60000),
    "presence-in-online": PresenceUpdate(BOB, "available"),
    "chatstate-out": ChatState(BOB, "composing"),
    "chatstate-in": IncomingChatState(ALICE, "composing"),
    "privacy-out": Privacy("p1", last="contacts", online="contacts"),
    "privacy-out-v1": (Privacy("p1", last="contacts", online="contacts"), 1),
    "privacy-query": Privacy("p2"),
    "privacy-in": PrivacySettings("p1", "contacts", "contacts"),
    "discover-out": Discover("d1", "full", (BOB, CAROL, "4930123456789")),
    "discover-in": DiscoverResult("d1", (BOB, CAROL), 1997),
    "block": Block("b1", CAROL),
    "ack-block": ServerAck("b1", T, "block"),
    "unblock": Unblock("b2", CAROL),
    "blocklist-out": BlocklistQuery("b3"),
    "blocklist-in": Blocklist("b3", (CAROL,)),
    "error": Error(ErrorCode.UNKNOWN_RECIPIENT, "not a registered user", "3eb0c1f2a4d5e6f7"),
    "logout": Logout("x1"),
    "ack-logout": ServerAck("x1", T, "logout"),
    "delete": DeleteAccount("x2"),
    "ping": Ping("k1"),
    "pong": Pong("k1"),
}


def _hex(data: bytes, width: int = 16) -> str:
    lines = []
    for i in range(0, len(data), width):
        lines.append(" ".join(f"{b:02x}" for b in data[i : i + width]))
    return "\n".join(lines)


def example(name: str):
    """(event, dictionary version) of an example: the newest version unless it names one."""
    ex = EXAMPLES[name]
    return ex if isinstance(ex, tuple) else (ex, LATEST.version)


def example_block(name: str) -> str:
    event, version = example(name)
    codec = _pycodec.Codec(DICTIONARIES[version])
    node = event.to_node(_pycodec.Node)
    frame = codec.encode_frame(node)
    note = "" if version == LATEST.version else f" (dictionary version {version})"
    return (
        f"```hex\n# {format_node(node)}{note}\n{_hex(frame)}\n```\n"
        f"{len(frame)} bytes: 3 of frame header, {len(frame) - 3} of node.\n"
    )


def preamble_block() -> str:
    return f"```hex\n# preamble, dictionary version {LATEST.version}\n{_hex(preamble(LATEST.version))}\n```\n"


def tokens_table() -> str:
    out = [
        f"Dictionary version {LATEST.version}: {sum(1 for c in LATEST.codes.values() if c < 0x100)} "
        f"one-byte and {sum(1 for c in LATEST.codes.values() if c >= 0x100)} two-byte tokens.\n",
        "| code | string | code | string | code | string | code | string |",
        "|---|---|---|---|---|---|---|---|",
    ]
    entries = [(f"`{c:02x}`" if c < 0x100 else f"`{c:04x}`", f"`{s}`") for c, s in LATEST.entries()]
    for i in range(0, len(entries), 4):
        row = entries[i : i + 4]
        row += [("", "")] * (4 - len(row))
        out.append("| " + " | ".join(f"{c} | {s}" for c, s in row) + " |")
    out.append("\nVersion 1 is the first table; what each later version appended:\n")
    for v in sorted(DICTIONARIES)[2:]:
        prev = DICTIONARIES[v - 1].codes
        new = [(c, s) for c, s in DICTIONARIES[v].entries() if s not in prev]
        out.append(f"- version {v}: " + ", ".join(
            f"`{s}` (`{c:02x}`)" if c < 0x100 else f"`{s}` (`{c:04x}`)" for c, s in new))  # fmt: skip
    return "\n".join(out) + "\n"


def sections() -> dict[str, str]:
    out = {"tokens": tokens_table(), "preamble": preamble_block()}
    for name in EXAMPLES:
        out[f"example {name}"] = example_block(name)
    return out


_MARK = re.compile(
    r"(<!-- BEGIN (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.S
)


def render(text: str) -> tuple[str, set[str]]:
    """The doc with every generated section refreshed, and the names found."""
    gen = sections()
    found = set()

    def sub(m):
        name = m.group("name")
        if name not in gen:
            raise KeyError(f"unknown generated section {name!r}")
        found.add(name)
        return m.group(1) + gen[name] + m.group(4)

    return _MARK.sub(sub, text), found


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    if len(paths) != 1:
        print("usage: python -m pigeon.tools.protodoc [--check] docs/PROTOCOL.md", file=sys.stderr)
        return 2
    path = paths[0]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new, found = render(text)
    missing = set(sections()) - found
    if missing:
        print(f"{path}: no markers for {sorted(missing)}", file=sys.stderr)
        return 1
    if check:
        if new != text:
            print(
                f"{path} is out of date: run python -m pigeon.tools.protodoc {path}",
                file=sys.stderr,
            )
            return 1
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
