"""Shared fixtures: every codec test runs against both implementations.

The fastpath must be present: a missing extension fails the run (it would
otherwise silently test only pure Python), unless the package was built
with PIGEON_NO_EXTENSIONS=1 on purpose.
"""

import os

import pytest
from hypothesis import HealthCheck, settings

# Two busy cores: no deadlines, and in CI the same examples every run.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=150)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

IMPLEMENTATIONS = ["python", "fastpath"]


def load_impl(name):
    if name == "python":
        from pigeon.core import _pycodec

        return _pycodec
    try:
        from pigeon.fastpath import _codec
    except ImportError as exc:
        if os.environ.get("PIGEON_NO_EXTENSIONS") == "1":
            pytest.skip("built without extensions (PIGEON_NO_EXTENSIONS=1)")
        pytest.fail(f"the fastpath extension is not built: {exc}")
    return _codec


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """The codec module under test: pigeon.core._pycodec or pigeon.fastpath._codec."""
    return load_impl(request.param)


@pytest.fixture
def both():
    """(python, fastpath) modules, for differential tests."""
    return load_impl("python"), load_impl("fastpath")
