"""Benchmarks run each implementation in one process, so their ratio is measured in one run."""

import pytest


@pytest.fixture(params=["python", "fastpath"])
def impl(request):
    if request.param == "python":
        from pigeon.core import _pycodec

        return _pycodec
    from pigeon.fastpath import _codec

    return _codec
