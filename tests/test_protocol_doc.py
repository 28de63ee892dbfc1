"""docs/PROTOCOL.md is the contract: check it against the code, independently of its generator."""

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
