"""Coverage-guided fuzzing of both decoders with atheris (optional; not part of the suite).

    pip install atheris
    python tests/fuzz/atheris_decoder.py -max_total_time=300

Finds inputs where an implementation raises anything but CodecError, or where
the two disagree; libFuzzer saves such an input as crash-<hash>.
"""

import sys

import atheris

with atheris.instrument_imports():
    from pigeon.core import _pycodec
    from pigeon.core.errors import CodecError
    from pigeon.fastpath import _codec

PY, FAST = _pycodec.Codec(), _codec.Codec()


def outcome(codec, data):
    try:
        return ("node", codec.decode(data))
    except CodecError as exc:
        return ("error", type(exc))


def test_one_input(data: bytes) -> None:
    a, b = outcome(PY, data), outcome(FAST, data)
    if a != b:
        raise AssertionError(f"implementations disagree on {data.hex()}: {a} vs {b}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
