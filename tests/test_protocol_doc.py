"""docs/PROTOCOL.md is the contract: check it against the code, independently of its generator."""

import base64
import re
from pathlib import Path

import pytest

from pigeon.core.errors import FATAL_CODES, ErrorCode
from pigeon.core.events import CLIENT_SENT, SERVER_SENT
from pigeon.core.node import format_node
from pigeon.core.tokens import DICTIONARIES, LATEST
from pigeon.core.wire import preamble
from pigeon.tools import protodoc

DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"
TEXT = DOC.read_text(encoding="utf-8")
HEX_BLOCKS = re.findall(r"```hex\n# (.*?)\n(.*?)```", TEXT, re.S)


def test_generated_sections_are_current():
    assert protodoc.main(["--check", str(DOC)]) == 0


def test_every_example_decodes_to_its_caption(impl):
    assert len(HEX_BLOCKS) >= 20
    for caption, hexdump in HEX_BLOCKS:
        data = bytes.fromhex(hexdump.replace("\n", " "))
        if caption.startswith("preamble"):
            assert data == preamble(LATEST.version)
            continue
        # an example may be in an older dictionary, and then says which
        m = re.fullmatch(r"(.*) \(dictionary version (\d+)\)", caption)
        version = int(m.group(2)) if m else LATEST.version
        caption = m.group(1) if m else caption
        codec = impl.Codec(DICTIONARIES[version])
        reader = impl.FrameReader()
        reader.feed(data)
        node = reader.next_node(codec)
        assert reader.buffered == 0, caption
        assert format_node(node) == caption
        assert codec.encode_frame(node) == data  # the examples are canonical


def test_every_node_type_has_a_section_and_an_example():
    for tag in set(CLIENT_SENT) | set(SERVER_SENT):
        assert re.search(rf"^### `{tag}`", TEXT, re.M), f"no section for <{tag}>"
        assert any(c.startswith(f"<{tag}") for c, _ in HEX_BLOCKS), f"no example of <{tag}>"


def test_error_code_table_matches():
    rows = dict(
        (int(code), (name, fatal))
        for code, name, fatal in re.findall(r"^\| (\d{3}) \| (\w+) \| (yes|no) \|", TEXT, re.M)
    )
    assert set(rows) == {int(c) for c in ErrorCode}
    for c in ErrorCode:
        assert rows[int(c)] == (c.name, "yes" if c in FATAL_CODES else "no"), c


@pytest.mark.parametrize("code, string", LATEST.entries())
def test_token_table_row(code, string):
    cell = f"`{code:02x}`" if code < 0x100 else f"`{code:04x}`"
    assert f"{cell} | `{string}`" in TEXT


# -- the worked SCRAM example (section 8), against the SDK's and the server's code ------

SCRAM_ROWS = dict(re.findall(r"^\| ([\w -]+) \| `([^`]*)` \|", TEXT.split("<!-- BEGIN scram -->")[1]
                             .split("<!-- END scram -->")[0], re.M))  # fmt: skip


def example_node(impl, name: str):
    """The node of the hex example whose caption starts with ``<name``."""
    (hexdump,) = [h for c, h in HEX_BLOCKS if re.match(rf"<{name}[ >/]", c)]
    reader = impl.FrameReader()
    reader.feed(bytes.fromhex(hexdump.replace("\n", " ")))
    return reader.next_node(impl.Codec(LATEST))


def test_the_worked_scram_example_is_what_the_sdk_and_the_server_compute(tmp_path):
    from pigeon.client._core import Credentials, ScramLogin
    from pigeon.core.events import AuthChallenge, AuthSuccess
    from pigeon.server.accounts import Accounts, device_keys, make_gateway
    from pigeon.server.config import load
    from pigeon.server.store import Store

    v = SCRAM_ROWS
    secret = bytes.fromhex(v["device secret"])
    assert len(secret) == 32 and v["password"] == secret.hex()  # 64 lowercase hex characters
    device, salt = v["username"], base64.b64decode(v["salt"])
    iterations = int(v["iteration count"])
    # the server: a store holding this device as a registration would leave it
    config = load(overrides={"data_dir": str(tmp_path), "scram_iterations": iterations})
    store = Store(str(tmp_path / "store"), map_size=64 << 20)
    try:
        address, _ = store.register_device(device.partition(":")[0], bytes(32),
                                           device_keys(secret, iterations, salt))  # fmt: skip
        assert address == device
        rec = store.device(device)
        assert (rec["stored_key"].hex(), rec["server_key"].hex()) == (
            v["StoredKey"],
            v["ServerKey"],
        )
        server = Accounts(store, config, make_gateway(config)).scram_server(v["server nonce"])
        server.set_client_first(v["client-first-message"])
        assert server.get_server_first() == v["server-first-message"]
        server.set_client_final(v["client-final-message"])  # raises unless the proof is right
        assert server.get_server_final() == v["server-final-message"]
    finally:
        store.close()
    # the client: the SDK, with the example's nonce
    client = ScramLogin(Credentials(device, secret), c_nonce=v["client nonce"])
    assert client.first().data.decode() == v["client-first-message"]
    challenge = AuthChallenge(v["server-first-message"].encode())
    assert client.final(challenge).data.decode() == v["client-final-message"]
    client.check(AuthSuccess(v["server-final-message"].encode(), 0))  # accepts the signature
    # the parts are what the messages carry
    assert v["client-first-message"] == f"n,,n={device},r={v['client nonce']}"
    nonce = v["client nonce"] + v["server nonce"]
    assert v["server-first-message"] == f"r={nonce},s={v['salt']},i={iterations}"
    assert v["client-final-message"] == f"c=biws,r={nonce},p={v['ClientProof']}"
    assert v["server-final-message"] == f"v={v['ServerSignature']}"
    assert v["AuthMessage"] == (
        f"{v['client-first-message'][3:]},{v['server-first-message']},c=biws,r={nonce}"
    )


def test_the_scram_example_is_refused_with_another_secret_or_signature(tmp_path):
    from scramp import ScramException

    from pigeon.client._core import Credentials, ScramLogin
    from pigeon.core.events import AuthChallenge, AuthSuccess

    v = SCRAM_ROWS
    wrong = bytes(32)
    client = ScramLogin(Credentials(v["username"], wrong), c_nonce=v["client nonce"])
    client.first()
    final = client.final(AuthChallenge(v["server-first-message"].encode())).data.decode()
    assert final != v["client-final-message"]  # the proof depends on the secret
    client = ScramLogin(Credentials(v["username"], bytes.fromhex(v["device secret"])),
                        c_nonce=v["client nonce"])  # fmt: skip
    client.first()
    client.final(AuthChallenge(v["server-first-message"].encode()))
    forged = "v=" + base64.b64encode(bytes(32)).decode()
    with pytest.raises(ScramException):
        client.check(AuthSuccess(forged.encode(), 0))


def test_the_login_examples_carry_the_worked_example(impl):
    v = SCRAM_ROWS
    secret = bytes.fromhex(v["device secret"])
    registered = example_node(impl, "registered")
    assert registered.attrs["device"] == v["username"] and bytes(registered.content) == secret
    for tag, row in (("auth", "client-first-message"), ("challenge", "server-first-message"),
                     ("response", "client-final-message"), ("success", "server-final-message")):  # fmt: skip
        assert bytes(example_node(impl, tag).content) == v[row].encode(), tag
    assert example_node(impl, "auth").attrs["mech"] == "SCRAM-SHA-256"


# -- other byte-level claims in the prose ------------------------------------------------

INLINE = re.findall(r"`([^`\s]+)` is\s+`((?:[0-9a-f]{2} )+[0-9a-f]{2})`", TEXT)


def test_inline_string_encodings_in_the_prose(impl):
    """`<string>` is `<hex>`: the item the reference encoder writes for that string."""
    assert {"491701234567", "3eb0c1f2a4d5e6f7", "491701234567:0", "g:120363012345"} <= {
        s for s, _ in INLINE
    }
    codec = impl.Codec(LATEST)
    for string, hexdump in INLINE:
        item = bytes.fromhex(hexdump)
        frame = codec.encode_frame(impl.Node("ping", {"id": string}))
        assert frame.endswith(item), (string, frame.hex(" "))
        # and a decoder reads the item back as that string
        reader = impl.FrameReader()
        head = bytes([0xF8, 3, LATEST.codes["ping"], LATEST.codes["id"]])
        reader.feed((len(head) + len(item)).to_bytes(3, "big") + head + item)
        assert reader.next_node(codec).attrs["id"] == string


def test_what_each_dictionary_version_contains():
    lines = dict(re.findall(r"^- version (\d+): (.*)$", TEXT, re.M))
    assert set(map(int, lines)) == set(DICTIONARIES) - {0}
    v1 = DICTIONARIES[1]
    singles = sorted(c for c in v1.codes.values() if c < 0x100)
    doubles = sorted(c for c in v1.codes.values() if c >= 0x100)
    assert lines["1"] == (
        f"`{singles[0]:02x}`…`{singles[-1]:02x}` ({len(singles)} one-byte tokens) and "
        f"`{doubles[0]:04x}`…`{doubles[-1]:04x}` ({len(doubles)} two-byte tokens)"
    )
    assert len(singles) == singles[-1] - singles[0] + 1  # no holes: a range says it all
    for v in sorted(DICTIONARIES)[2:]:
        added = {
            s: c for s, c in DICTIONARIES[v].codes.items() if s not in DICTIONARIES[v - 1].codes
        }
        listed = dict(re.findall(r"`([^`]+)` \(`([0-9a-f]+)`\)", lines[str(v)]))
        assert listed == {s: f"{c:02x}" if c < 0x100 else f"{c:04x}" for s, c in added.items()}
        assert lines[str(v)].startswith(f"version {v - 1}, plus ")
    assert "version 1 of pigeon's own dictionary" not in TEXT


# -- the limits table (section 13) against the server's defaults ---------------------------


def _renderings(value) -> list[str]:
    out = [f"{value:,}" if isinstance(value, int) else f"{value:,g}"]
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        out.append(f"{value >> 20} MiB")
    if value >= 3600 and value % 3600 == 0:
        out.append(f"{value / 3600:g} h")
    if value >= 86400 and value % 86400 == 0:
        out.append(f"{value / 86400:g} days")
    return out


def test_the_limits_table_names_every_limit_a_client_meets_with_its_default():
    from pigeon.server.config import OPTIONS

    defaults = {o.name: o.default for o in OPTIONS}
    section = TEXT.split("## 13. Limits")[1].split("## 14.")[0]
    rows = re.findall(r"^\| (.*?) \| (.*?) \| (.*?) \|$", section, re.M)
    named = {}
    for limit, default, _ in rows:
        for group in re.findall(r"\(([^)]*)\)", limit):
            for name in re.split(r"[;,]", group):
                key = name.strip().replace("-", "_")
                if key in defaults:
                    named.setdefault(key, default)
    for key in ("login_timeout", "idle_timeout", "register_per_phone", "register_per_ip",
                "register_window", "code_attempts", "code_ttl", "login_failures",
                "login_failures_per_ip", "login_window", "max_connections_per_ip",
                "max_connections", "dedup_window", "max_frame", "media_max_bytes",
                "media_quota_uploads", "media_quota_bytes", "media_grant_ttl",
                "media_request_rate", "media_transfers_per_ip"):  # fmt: skip
        assert key in named, f"section 13 does not name {key.replace('_', '-')}"
    checked = 0
    for limit, default, _ in rows:
        keys = [k for g in re.findall(r"\(([^)]*)\)", limit)
                for k in (n.strip().replace("-", "_") for n in re.split(r"[;,]", g))
                if k in defaults]  # fmt: skip
        if not keys or not default[:1].isdigit():
            continue  # a derived value ("max_frame − 256") or a rule, not a number
        value = defaults[keys[0]]
        assert any(re.match(rf"{re.escape(r)}(?![,.]?\d)", default) for r in _renderings(value)), (
            f"section 13 says {default!r} for {keys[0]}, the default is {value!r}"
        )
        checked += 1
    assert checked >= 20
