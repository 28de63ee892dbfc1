"""Server configuration: defaults, TOML file, flags, and errors that say what to fix."""

import pytest

from pigeon.server.config import OPTIONS, ConfigError, load


def test_defaults_need_no_file():
    c = load()
    assert c.listen == "127.0.0.1:7650" and c.data_dir == "var" and not c.tls_enabled
    assert c.worker_count >= 1 and c.max_frame == 1 << 20
    assert all(o.help for o in OPTIONS)


def test_file_then_flags(tmp_path):
    f = tmp_path / "pigeon.toml"
    f.write_text('listen = "127.0.0.1:9000"\nlogin-timeout = 3\nidle_timeout = 30.5\nworkers = 2\n')
    c = load(str(f))
    assert (c.listen, c.login_timeout, c.idle_timeout, c.workers) == (
        "127.0.0.1:9000",
        3.0,
        30.5,
        2,
    )
    c = load(str(f), {"listen": "127.0.0.1:9001", "workers": "3", "data_dir": None})
    assert (c.listen, c.workers, c.data_dir) == ("127.0.0.1:9001", 3, "var")
    assert c.replace(workers=1).workers == 1 and c.workers == 3


@pytest.mark.parametrize(
    "toml, message",
    [
        ("login-timeout = 'soon'", "login-timeout: must be a number > 0, got 'soon'"),
        ("workers = -1", "workers: must be an integer >= 0"),
        ("workers = 1.5", "workers: must be an integer >= 0"),
        ("max-frame = 0", "max-frame: must be an integer > 0"),
        ("listen = '7650'", "listen: must be HOST:PORT"),
        ("sms-gateway = 'carrier-pigeon'", "sms-gateway: must be one of log, webhook"),
        ("sms-gateway = 'webhook'", "needs sms-webhook-url"),
        ("tls-key = 'k.pem'", "tls-key is set but tls-cert is not"),
        ("listn = '127.0.0.1:1'", "unknown setting 'listn'"),
        ("listen = ", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path, toml, message):
    f = tmp_path / "bad.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load(str(f))
    assert message in str(info.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such file"):
        load("/nonexistent/pigeon.toml")


def test_operations_doc_lists_every_setting():
    from pathlib import Path

    from pigeon.server.config import OPTIONS
    from pigeon.tools import opsdoc

    doc = Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md"
    assert opsdoc.main(["--check", str(doc)]) == 0, "run python -m pigeon.tools.opsdoc"
    text = doc.read_text()
    for o in OPTIONS:
        assert f"| `{o.name.replace('_', '-')}` |" in text
