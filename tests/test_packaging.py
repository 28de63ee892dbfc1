"""The installed package: one namespace, no generated C, the implementation choice."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

import pigeon.core


def run(code, **env):
    full = {**os.environ, **env}
    for k, v in env.items():
        if v is None:
            full.pop(k)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=True,
    ).stdout.strip()


def test_fastpath_is_the_default():
    if os.environ.get("PIGEON_NO_EXTENSIONS") == "1":
        pytest.skip("built without extensions on purpose")
    out = run(
        "import pigeon.core as c, pigeon.fastpath._codec as f;"
        "print(c.IMPLEMENTATION, c.Node is f.Node, c.Codec is f.Codec)",
        PIGEON_PUREPYTHON=None,
    )
    assert out == "fastpath True True"


@pytest.mark.parametrize("value", ["1", "yes"])
def test_purepython_env_forces_python(value):
    out = run(
        "import pigeon.core as c, pigeon.core._pycodec as p;"
        "print(c.IMPLEMENTATION, c.Node is p.Node, c.FrameReader is p.FrameReader)",
        PIGEON_PUREPYTHON=value,
    )
    assert out == "python True True"


def test_importing_fastpath_first_is_fine():
    out = run("import pigeon.fastpath._codec; import pigeon.core as c; print(c.IMPLEMENTATION)")
    assert out in ("fastpath", "python")


def installed_distribution():
    """This interpreter's installed pigeon (not a stray egg-info in the checkout)."""
    site = sysconfig.get_paths()["purelib"]
    dists = list(metadata.distributions(name="pigeon", path=[site]))
    assert dists, f"pigeon is not installed in {site}"
    direct = dists[0].read_text("direct_url.json") or "{}"
    if json.loads(direct).get("dir_info", {}).get("editable"):
        pytest.skip("editable install: the wheel layout is checked on a regular install (CI)")
    return dists[0]


def test_installed_under_one_namespace_without_generated_c():
    files = installed_distribution().files
    assert files
    tops = set()
    for f in files:
        parts = Path(str(f)).parts
        if parts[0] == ".." or parts[0].endswith(".dist-info"):
            continue
        tops.add(parts[0])
        assert f.suffix not in (".c", ".pyx", ".pxi", ".pxd", ".html"), f
    assert tops == {"pigeon"}
    names = {str(f) for f in files}
    assert any(
        n.startswith("pigeon/fastpath/_codec") and n.endswith((".so", ".pyd")) for n in names
    ) or (os.environ.get("PIGEON_NO_EXTENSIONS") == "1")
    assert "pigeon/core/__init__.py" in names and "pigeon/server/__init__.py" in names


def test_console_script():
    exe = shutil.which("pigeon", path=str(Path(sys.executable).parent)) or shutil.which("pigeon")
    assert exe, "the pigeon console script is not installed"
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith(
        f"pigeon {pigeon.core.__version__} (protocol 1, dictionary {pigeon.core.tokens.LATEST_VERSION}, codec "
    )
