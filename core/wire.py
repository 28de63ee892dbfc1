"""Wire constants shared by both codec implementations (see docs/PROTOCOL.md)."""

MAGIC = b"PGN"
PROTOCOL_VERSION = 1
PREAMBLE_SIZE = 5  # magic, protocol version, dictionary version
FRAME_HEADER_SIZE = 3

# Item type bytes. 0x01..0xEB are one-byte tokens, 0xEC..0xEF two-byte token pages.
ADDR_DEVICE = 0xF0
ADDR_GROUP = 0xF1
LIST_8 = 0xF8
LIST_16 = 0xF9
PACKED = 0xFA
BIN_8 = 0xFC
BIN_16 = 0xFD
BIN_32 = 0xFE
# 0x00, 0xF2..0xF7, 0xFB and 0xFF are reserved: a decoder rejects them.

#: Alphabet of PACKED strings: symbol value = index.
PACKED_ALPHABET = "0123456789abcdef"
MAX_PACKED = 255


def preamble(dictionary_version: int, protocol_version: int = PROTOCOL_VERSION) -> bytes:
    return MAGIC + bytes((protocol_version, dictionary_version))
