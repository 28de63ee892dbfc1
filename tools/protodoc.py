"""Generated sections of docs/PROTOCOL.md: the token table, the hex examples
and the worked SCRAM login.

The prose of PROTOCOL.md is written by hand; the parts that must match the
code byte for byte are generated between markers

    <!-- BEGIN tokens -->            ...  <!-- END tokens -->
    <!-- BEGIN example NAME -->      ...  <!-- END example NAME -->
    <!-- BEGIN scram -->             ...  <!-- END scram -->

The SCRAM values come from running the SDK's client half (``ScramLogin``)
against the server's (``pigeon.server.accounts``) with fixed nonces and salt,
so the ``auth``/``challenge``/``response``/``success`` examples carry them.

``python -m pigeon.tools.protodoc docs/PROTOCOL.md`` rewrites them in place;
``--check`` exits 1 if the file is out of date (the test suite runs that).
Examples are encoded with the newest dictionary by the pure-Python codec.
"""

from __future__ import annotations

import base64
import re
import sys

from pigeon.client._core import Credentials, ScramLogin
from pigeon.client.identity import Identity
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
    DeviceInfo,
    DeviceList,
    DeviceLists,
    DevicesBatchQuery,
    DevicesChanged,
    DevicesQuery,
    Discover,
    DiscoverResult,
    Error,
    GroupMember,
    GroupNotice,
    GroupRequest,
    GroupResult,
    IncomingChatState,
    IncomingMessage,
    IncomingReceipt,
    KeyBundle,
    KeyBundles,
    KeysChanged,
    KeysCount,
    KeysCountQuery,
    KeysLow,
    KeysQuery,
    KeysUpload,
    Link,
    LinkKey,
    Logout,
    Message,
    Pair,
    PairCode,
    Ping,
    Pong,
    Presence,
    PresenceUpdate,
    Privacy,
    PrivacySettings,
    PushTarget,
    Receipt,
    Register,
    Registered,
    ServerAck,
    SignedKey,
    Unblock,
    Unlink,
    UploadGrant,
    UploadRequest,
    Verify,
    signed_key_message,
)
from pigeon.core.node import format_node
from pigeon.core.tokens import DICTIONARIES, LATEST
from pigeon.core.wire import preamble
from pigeon.server.accounts import MECHANISM, device_keys

ALICE, BOB, CAROL = "491701234567", "4915112345678", "447700900123"
T = 1763830000123
GROUP = "g:120363"  # a group address (section 4)
INVITE = "Gq3v7KpX2mRtY9bWc4NdFh"  # an invite code (22 characters, what the server makes)
BODY = bytes.fromhex("33088a1b2c3d4e5f60718293a4b5c6d7")  # stands in for ciphertext
# The worked SCRAM example of section 8: the device registered in section 7's
# example (its secret is that example's content), fixed nonces and salt.
SECRET = bytes(range(32, 64))
NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "ZtUcCsQ1lfW1UMRv"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
ITERATIONS = 4096
# Section 7a: the primary's and the companion's identity keys, from fixed seeds
# (Ed25519 signatures are deterministic, so the link signature is fixed too).
PRIMARY_ID = Identity.from_private_bytes(bytes(range(100, 132)))
COMPANION_ID = Identity.from_private_bytes(bytes(range(200, 232)))
REF = "5f1c9a0e3b7d24c68e1f0a9b3c5d7e21"
LINK_CODE = "ABCD2345"
LINK_SIG = PRIMARY_ID.sign_link(ALICE, COMPANION_ID.public)
COMPANION = ALICE + ":3"
# Section 9c: Alice's primary's Curve25519 identity key and two one-time keys
# (fixed bytes stand in for what vodozemac makes), signed by its Ed25519 key.
CURVE = bytes(range(1, 33))
OTK_A, OTK_B, FALLBACK = bytes(range(33, 65)), bytes(range(65, 97)), bytes(range(97, 129))


def _signed(key_id: str, key: bytes, fallback: bool = False) -> SignedKey:
    msg = signed_key_message(ALICE + ":0", key_id, key, fallback)
    return SignedKey(key_id, key, PRIMARY_ID.sign(msg), fallback)


def scram_example() -> dict[str, str]:
    """Every value of the worked login, computed by the SDK's and the server's own code."""
    device = ALICE + ":0"
    keys = device_keys(SECRET, ITERATIONS, SALT)
    client = ScramLogin(Credentials(device, SECRET), c_nonce=NONCE)
    server = MECHANISM.make_server(lambda user: keys, s_nonce=SERVER_NONCE)
    client_first = client.first().data.decode()
    server.set_client_first(client_first)
    server_first = server.get_server_first()
    client_final = client.final(AuthChallenge(server_first.encode())).data.decode()
    server.set_client_final(client_final)
    server_final = server.get_server_final()
    client.check(AuthSuccess(server_final.encode(), T))  # the client accepts it
    without_proof, _, proof = client_final.rpartition(",p=")
    return {
        "device secret": SECRET.hex(),
        "password": SECRET.hex(),
        "username": device,
        "client nonce": NONCE,
        "client-first-message": client_first,
        "server nonce": SERVER_NONCE,
        "salt": base64.b64encode(SALT).decode(),
        "iteration count": str(ITERATIONS),
        "server-first-message": server_first,
        "StoredKey": keys[1].hex(),
        "ServerKey": keys[2].hex(),
        "AuthMessage": f"{client_first[3:]},{server_first},{without_proof}",
        "ClientProof": proof,
        "client-final-message": client_final,
        "ServerSignature": server_final.removeprefix("v="),
        "server-final-message": server_final,
    }


SCRAM = scram_example()
#: what each row of the worked example says about its value
SCRAM_NOTES = {
    "device secret": "32 bytes, in hex: the content of `registered`",
    "password": "the secret as 64 lowercase hex characters (ASCII), not the raw bytes",
    "username": "the device address",
    "client nonce": "fixed here; a real client makes a fresh random one for each login",
    "client-first-message": "content of `auth`: `n,,` then `n=` username, `r=` client nonce",
    "server nonce": "what the server appends to the client nonce (random on a real server)",
    "salt": "16 bytes, in base64; the device's, fixed when it registered",
    "iteration count": "the server's `scram-iterations` when the device registered",
    "server-first-message": "content of `challenge`",
    "StoredKey": "SHA-256(ClientKey), in hex: what the server stores",
    "ServerKey": 'HMAC(SaltedPassword, "Server Key"), in hex: what the server stores',
    "AuthMessage": "client-first-message without `n,,`, `,` server-first-message, `,` "
    "client-final-message without its `,p=…`",
    "ClientProof": "ClientKey XOR HMAC(StoredKey, AuthMessage), in base64",
    "client-final-message": "content of `response`: `c=biws` (`n,,` in base64), `r=` the "
    "combined nonce, `p=` ClientProof",
    "ServerSignature": "HMAC(ServerKey, AuthMessage), in base64",
    "server-final-message": "content of `success`: `v=` ServerSignature",
}

#: SHA-256 of a ciphertext, for the media examples
MEDIA_SHA = bytes.fromhex("9f2c6b0e51d84a7389e1c4f06b2d7a5e3c8f91b04d6e2a7c15b9f3e80d4a6c21")

EXAMPLES = {
    "register": Register("r1", ALICE),
    "code": CodeSent("r1", 300),
    "verify": Verify("r2", ALICE, "123456", bytes(range(32))),
    "registered": Registered("r2", ALICE + ":0", SECRET),
    "auth": AuthStart(SCRAM["client-first-message"].encode()),
    "challenge": AuthChallenge(SCRAM["server-first-message"].encode()),
    "response": AuthResponse(SCRAM["client-final-message"].encode()),
    "success": AuthSuccess(SCRAM["server-final-message"].encode(), T),
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
    "message-sync-in": IncomingMessage(ALICE + ":1", "3eb0c1f2a4d5e6f7", "text", T, 7, BODY, BOB),
    "message-payloads": Message(
        BOB,
        "3eb0c1f2a4d5e6f7",
        "pkmsg",
        b"",
        ((BOB + ":0", BODY[:8]), (BOB + ":2", BODY[8:]), (ALICE + ":1", BODY[4:12])),
    ),  # fmt: skip
    "error-stale": Error(
        ErrorCode.STALE_DEVICES,
        "the payloads do not match the device lists",
        "3eb0c1f2a4d5e6f7",
        (BOB + ":3",),
        (BOB + ":2",),
    ),
    "receipt-sync-in": IncomingReceipt(BOB, "3eb0c1f2a4d5e6f7", "read", T + 900, 8, ALICE),
    "message-history": Message(ALICE + ":3", "h1", "history", BODY),
    "devices-notice": DevicesChanged(ALICE, T, 9),
    "ping": Ping("k1"),
    "pong": Pong("k1"),
    "pair-qr": Pair("p1", "qr", COMPANION_ID.public, name="desktop"),
    "pair-ref": PairCode("p1", 60, ref=REF),
    "pair-code": Pair("p1", "code", COMPANION_ID.public, phone=ALICE, name="desktop"),
    "pair-code-in": PairCode("p1", 60, code=LINK_CODE),
    "link-qr": Link("l1", ref=REF, key=COMPANION_ID.public, signature=LINK_SIG),
    "link-code": Link("l1", code=LINK_CODE),
    "link-key": LinkKey("l1", LINK_CODE, COMPANION_ID.public),
    "link-code-signed": Link("l2", code=LINK_CODE, key=COMPANION_ID.public, signature=LINK_SIG),
    "ack-link": ServerAck("l1", T, "link", COMPANION),
    "devices-out": DevicesQuery("d1", ALICE),
    "devices-in": DeviceList("d1", ALICE, (
        DeviceInfo(ALICE + ":0", T - 86_400_000, PRIMARY_ID.public),
        DeviceInfo(COMPANION, T, COMPANION_ID.public, "desktop", LINK_SIG),
    )),
    "devices-batch-out": DevicesBatchQuery("d2", (ALICE, BOB)),
    "devices-batch-in": DeviceLists("d2", (
        (ALICE, (DeviceInfo(ALICE + ":0", T - 86_400_000, PRIMARY_ID.public),)),
        (BOB, ()),
    )),
    "unlink": Unlink("u1", COMPANION),
    "ack-unlink": ServerAck("u1", T, "unlink"),
    "keys-upload": KeysUpload("k1", CURVE, PRIMARY_ID.public,
                              (_signed("AAAAAAAAAAA", OTK_A), _signed("AAAAAAAAAAE", OTK_B)),
                              _signed("AAAAAAAAAAI", FALLBACK, True)),
    "keys-count": KeysCount("k1", 2),
    "keys-count-query": KeysCountQuery("k2"),
    "keys-get": KeysQuery("k3", (ALICE,)),
    "keys-bundles": KeyBundles("k3", (
        KeyBundle(ALICE + ":0", CURVE, PRIMARY_ID.public, _signed("AAAAAAAAAAA", OTK_A)),
        KeyBundle(COMPANION),
    )),
    "keys-bundle-fallback": KeyBundles("k4", (
        KeyBundle(ALICE + ":0", CURVE, PRIMARY_ID.public, _signed("AAAAAAAAAAI", FALLBACK, True)),
    )),
    "keys-low": KeysLow(ALICE + ":0", T, 10),
    "keys-changed": KeysChanged(ALICE, T, 11),
    "receipt-retry-out": Receipt(ALICE, "3eb0c1f2a4d5e6f7", "retry"),
    "receipt-retry-in": IncomingReceipt(BOB + ":0", "3eb0c1f2a4d5e6f7", "retry", T + 400, 12),
    "error-pair-expired": Error(ErrorCode.PAIR_EXPIRED, "the pairing code has expired; ask again",
                                "p1"),
    "upload-out": UploadRequest("m1", 2_000_016, MEDIA_SHA, "image"),
    "upload-in": UploadGrant("m1", "https://media.example.com/v1/upload/" + MEDIA_SHA.hex(), 600,
                             bytes(range(69))),
    "error-media-quota": Error(ErrorCode.MEDIA_QUOTA, "daily upload bytes reached", "m1"),
    # groups (section 10g)
    "group-create": GroupRequest("g1", "create", None, (BOB, CAROL), "trip"),
    "group-create-in": GroupResult("g1", "create", GROUP, (("subject", "trip"), ("t", str(T))),
                                   failed=((CAROL, ErrorCode.ADD_REFUSED),)),
    "group-info": GroupRequest("g2", "info", GROUP),
    "group-info-in": GroupResult("g2", "info", GROUP, (
        ("subject", "trip"), ("creator", ALICE), ("t", str(T)), ("announce", "0"),
        ("approval", "0")), (GroupMember(ALICE, "admin", T), GroupMember(BOB, "member", T)),
        description="bring boots"),
    "group-list": GroupRequest("g3", "list"),
    "group-list-in": GroupResult("g3", "list", items=((GROUP, "trip", T),)),
    "group-add": GroupRequest("g4", "add", GROUP, (CAROL,)),
    "group-add-in": GroupResult("g4", "add", GROUP, failed=((CAROL, ErrorCode.ADD_REFUSED),)),
    "group-leave": GroupRequest("g5", "leave", GROUP),
    "group-subject": GroupRequest("g6", "subject", GROUP, subject="trip 2"),
    "group-description": GroupRequest("g7", "description", GROUP, description="bring boots"),
    "group-settings": GroupRequest("g8", "settings", GROUP, announce=True),
    "group-settings-in": GroupResult("g8", "settings", GROUP, (("announce", "1"),
                                                               ("approval", "0"))),
    "group-invite": GroupRequest("g9", "invite", GROUP),
    "group-invite-in": GroupResult("g9", "invite", GROUP, (("code", INVITE),)),
    "group-preview": GroupRequest("ga", "preview", code=INVITE),
    "group-preview-in": GroupResult("ga", "preview", GROUP, (("subject", "trip"),
                                                             ("approval", "1"), ("count", "2"))),
    "group-join": GroupRequest("gb", "join", code=INVITE),
    "group-join-in": GroupResult("gb", "join", GROUP, (("requested", "1"),)),
    "group-requests-in": GroupResult("gc", "requests", GROUP, members=(GroupMember(CAROL, None, T),)),
    "group-approve": GroupRequest("gd", "approve", GROUP, (CAROL,)),
    "group-notice": GroupNotice(GROUP, "add", ALICE, T, 13, (CAROL,)),
    "group-notice-subject": GroupNotice(GROUP, "subject", ALICE, T, 14, (), (("subject", "trip 2"),)),
    "message-group-out": Message(GROUP, "3eb0c1f2a4d5e6f7", "text", BODY),
    "message-group-in": IncomingMessage(ALICE + ":0", "3eb0c1f2a4d5e6f7", "text", T, 15, BODY,
                                        group=GROUP),
    "message-group-payloads": Message(GROUP, "3eb0c1f2a4d5e6f8", "skmsg", BODY,
                                      ((BOB + ":0", bytes(8)), (CAROL + ":1", bytes(8)))),
    "message-group-payload-in": IncomingMessage(ALICE + ":0", "3eb0c1f2a4d5e6f8", "skmsg", T,
                                                16, BODY, None, GROUP, bytes(8)),
    "receipt-group-in": IncomingReceipt(GROUP, "3eb0c1f2a4d5e6f7", "delivered", T + 250, 17,
                                        None, (BOB, CAROL)),
    "receipt-group-out": Receipt(GROUP, "3eb0c1f2a4d5e6f7", "read", ALICE),
    "ack-group-failed": ServerAck("3eb0c1f2a4d5e6f7", T, "message", None, (CAROL,)),
    "error-not-member": Error(ErrorCode.NOT_MEMBER, "you are not a member of this group",
                              "3eb0c1f2a4d5e6f7"),
    "privacy-groupadd": Privacy("p3", groupadd="contacts"),
    "push-set": PushTarget("w1", "set", "fcm", b"dGVzdC1yZWdpc3RyYXRpb24tdG9rZW4", T + 3_600_000),
    "push-set-apns": PushTarget("w2", "set", "apns", b"ab" * 32, quiet=True),
    "push-remove": PushTarget("w3", "remove"),
    "ack-push": ServerAck("w1", T, "push"),
    "error-push-unavailable": Error(ErrorCode.UNAVAILABLE, "this server sends no apns push",
                                    "w2"),
}  # fmt: skip


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
    out.append("\nWhat each version contains:\n")
    for v in sorted(DICTIONARIES)[1:]:
        d = DICTIONARIES[v]
        if v == 1:
            out.append(f"- version 1: {_code_range(d, False)} and {_code_range(d, True)}")
            continue
        prev = DICTIONARIES[v - 1].codes
        new = [(c, s) for c, s in d.entries() if s not in prev]
        out.append(f"- version {v}: version {v - 1}, plus " + ", ".join(
            f"`{s}` (`{c:02x}`)" if c < 0x100 else f"`{s}` (`{c:04x}`)" for c, s in new))  # fmt: skip
    return "\n".join(out) + "\n"


def _code_range(d, double: bool) -> str:
    codes = [c for c in d.codes.values() if (c >= 0x100) == double]
    fmt = "04x" if double else "02x"
    kind = "two-byte" if double else "one-byte"
    return f"`{min(codes):{fmt}}`…`{max(codes):{fmt}}` ({len(codes)} {kind} tokens)"


def scram_table() -> str:
    out = ["| step | value | what it is |", "|---|---|---|"]
    for name, value in SCRAM.items():
        out.append(f"| {name} | `{value}` | {SCRAM_NOTES[name]} |")
    return "\n".join(out) + "\n"


def sections() -> dict[str, str]:
    out = {"tokens": tokens_table(), "preamble": preamble_block(), "scram": scram_table()}
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
