"""The pigeon command line (what exists of it so far)."""

import ssl

import orjson
import pytest

from pigeon.core.tokens import LATEST
from pigeon.tools.cli import main


def test_admin_decode(capsys):
    assert main(["admin", "decode", "50 47 4e 01 01", "00 00 08 f8 03 06 13 fc 02 6b 31"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "preamble: protocol 1, dictionary 1",
        '<ping id="k1"/>',
    ]


def test_admin_decode_json_and_stdin(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("00 00 0a f8 02 01 fc 05 68 65 6c 6c 6f\n"))
    assert main(["admin", "decode", "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out) == {
        "tag": "message",
        "attrs": {},
        "content": {"bytes": b"hello".hex()},
    }


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["admin", "decode", "zz"], 2, "not hex"),
        (["admin", "decode", "--dictionary", "9", "00"], 2, "unknown dictionary version 9"),
        (["admin", "decode", "00 00 02 f8 00"], 1, "error 120 MALFORMED_NODE"),
        (["admin", "decode", "00 00 05 f8"], 1, "incomplete frame"),
        (["serve", "--workers", "-1"], 2, "workers: must be an integer >= 0, got '-1'"),
        (["serve", "--listen", "7650"], 2, "must be HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:70000"], 2, "port must be 1-65535, got 70000"),
        (["serve", "--config", "/nonexistent/pigeon.toml"], 2, "no such file"),
        (["serve", "--tls-key", "k.pem"], 2, "tls-key is set but tls-cert is not"),
    ],
)
def test_errors_say_what_to_fix(capsys, args, code, message):
    assert main(args) == code
    assert message in capsys.readouterr().err


def test_admin_tokens(capsys):
    assert main(["admin", "tokens", "--json"]) == 0
    data = orjson.loads(capsys.readouterr().out)
    assert data["version"] == LATEST.version
    assert {r["string"]: int(r["code"], 16) for r in data["tokens"]} == LATEST.codes


def test_admin_gen_cert(tmp_path, capsys):
    out = tmp_path / "tls"
    assert main(["admin", "gen-cert", "--out-dir", str(out), "--name", "chat.example"]) == 0
    assert "pigeon serve --tls-cert" in capsys.readouterr().out
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(out / "cert.pem", out / "key.pem")  # a usable pair
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chat.example"]
    # no silent overwrite
    assert main(["admin", "gen-cert", "--out-dir", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["admin", "gen-cert", "--out-dir", str(out), "--days", "0"]) == 2
    assert "--days must be 1-36500, got 0" in capsys.readouterr().err
    # past 100 years: 99999999999 went up as OverflowError (timedelta), 3000000 too (year 9999)
    for days in ("36501", "3000000", "99999999999"):
        assert main(["admin", "gen-cert", "--out-dir", str(tmp_path / days), "--days", days]) == 2
        assert capsys.readouterr().err == (
            f"pigeon admin gen-cert: --days must be 1-36500, got {days}\n"
        )


@pytest.mark.parametrize("name", ["a b", "[::1]", "", "\u00fc.example", "-x.example"])
def test_admin_gen_cert_refuses_a_name_no_client_could_match(tmp_path, capsys, name):
    """'a b' and '[::1]' were written as DNS names (the brackets kept: no client reaching
    ::1 would match it); '' and 'ü.example' got cryptography's own wording."""
    out = tmp_path / "tls"
    assert main(["admin", "gen-cert", "--out-dir", str(out), f"--name={name}"]) == 2
    assert capsys.readouterr().err == (
        f"pigeon admin gen-cert: --name must be a host name (ASCII: IDNA for others) "
        f"or an IP address, got {name!r}\n"
    )
    assert not out.exists()


def test_admin_gen_cert_takes_wildcards_and_addresses(tmp_path):
    from cryptography import x509

    out = tmp_path / "tls"
    names = ["*.chat.example", "chat.example", "192.0.2.1", "2001:db8::1"]
    assert main(["admin", "gen-cert", "--out-dir", str(out), *[f"--name={n}" for n in names]]) == 0
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["*.chat.example", "chat.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == names[2:]


def test_serve_help_groups_the_settings_and_shows_values(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    sections = {}
    current = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = sections.setdefault(line[:-1], [])
        elif current is not None and line.lstrip().startswith("--"):
            current.append(line.split()[0])
    for title, flags in {
        "listeners": ["--listen", "--tls-listen", "--metrics-listen"],
        "storage": ["--data-dir", "--map-size", "--sync"],
        "abuse limits": ["--message-rate", "--new-chats"],
        "logging": ["--log-level", "--log-format"],
        "registration and SMS": ["--sms-gateway", "--code-ttl"],
    }.items():
        assert set(flags) <= set(sections.get(title, ())), (title, sections.get(title))
    flat = " ".join(out.split())
    assert "--listen HOST:PORT" in flat and "--metrics-listen HOST:PORT|off" in flat
    assert "--sync {fsync,os}" in flat and "--log-format {auto,json,text}" in flat
    assert "--idle-timeout SECONDS" in flat and "--delivered-receipts {true,false}" in flat
    assert "(default: 127.0.0.1:7650)" in flat and "(default: fsync)" in flat
    assert "LISTEN" not in out  # no metavar made from the option's name


def test_serve_reports_every_config_error(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("workers = -1\nlistn = '127.0.0.1:1'\n")
    assert main(["serve", "--config", str(f), "--listen", "127.0.0.1:99999"]) == 2
    err = capsys.readouterr().err
    assert "3 errors" in err
    assert f"{f}: workers: must be an integer >= 0, got -1" in err
    assert f"{f}: unknown setting 'listn': did you mean listen?" in err
    assert "command line: --listen: port must be 1-65535, got 99999" in err


def test_serve_refuses_a_config_file_that_is_not_utf8(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_bytes(b"\xff\xfe listen = 1")
    assert main(["serve", "--config", str(f)]) == 2
    want = f"{f}: not UTF-8 text (byte 0xff at offset 0): a TOML file must be UTF-8"
    assert capsys.readouterr().err == f"pigeon serve: {want}\n"


def test_admin_check_config_lists_every_error(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text("sync = 'sometimes'\nmetrics-listen = 'localhost:65536'\nwokers = 2\n")
    assert main(["admin", "check-config", str(f)]) != 0
    err = capsys.readouterr().err
    for line in (
        f"{f}: sync: must be one of fsync, os, got 'sometimes'",
        f"{f}: metrics-listen: port must be 1-65535, got 65536",
        f"{f}: unknown setting 'wokers': did you mean workers?",
    ):
        assert line in err, err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--map-size", "1"], "map-size must be at least 1048576 (1 MiB)"),
        (["--map-size", str(1 << 50)], "map-size must be at most 70368744177664 (64 TiB)"),
        (
            ["--map-size", str(1 << 64)],
            f"--map-size: must be at most 9007199254740992 (2**53), got '{1 << 64}'",
        ),
    ],
)
def test_serve_refuses_sizes_out_of_bounds(tmp_path, capsys, args, message):
    assert main(["serve", "--data-dir", str(tmp_path / "data"), *args]) == 2
    assert capsys.readouterr().err == f"pigeon serve: command line: {message}\n"
    assert not (tmp_path / "data").exists()  # refused before anything is made


@pytest.mark.parametrize(
    "value, message",
    [
        ("[::1", "--metrics: an IPv6 address must be in brackets (e.g. [::1]:7650), got '[::1'"),
        ("::1]:80", "--metrics: an IPv6 address must be in brackets (e.g. [::1]:7650)"),
        ("[x]:80", "--metrics: an IPv6 address must be in brackets (e.g. [::1]:7650)"),
        ("a b:80", "--metrics: host must be an IP address or a host name, got 'a b'"),
        ("[::1]:99999", "--metrics: port must be 1-65535, got 99999"),
        ("localhost", "--metrics must be HOST:PORT (e.g. 127.0.0.1:7650), got 'localhost'"),
    ],
)
@pytest.mark.parametrize("action", ["status", "stats"])
def test_admin_refuses_a_malformed_metrics_address(capsys, action, value, message):
    """'[::1' went up as urllib's ValueError (Invalid IPv6 URL), 'a b:80' as InvalidURL."""
    assert main(["admin", action, "--metrics", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pigeon admin {action}: {message}") and err.count("\n") == 1, err


def _serve_in_a_child(*args, cwd=None):
    """pigeon serve in its own process (it sets up logging), on a free port, no metrics."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "pigeon.tools.cli", "serve", "--listen", f"127.0.0.1:{port}",
           "--metrics-listen", "off", "--media-listen", "off", "--workers", "1", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/1"), reason="needs Linux /proc")
def test_serve_names_a_data_dir_it_cannot_use(tmp_path):
    """/proc/1 exists, so the data directory's makedirs passed; the store's went up as a
    FileNotFoundError traceback.  A data directory holding a file named store: the same."""
    proc = _serve_in_a_child("--data-dir", "/proc/1")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "pigeon serve: cannot create the store directory /proc/1/store: No such file or directory"
    ), proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "store").write_text("not a directory")
    proc = _serve_in_a_child("--data-dir", str(tmp_path))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"pigeon serve: cannot create the store directory {tmp_path}/store: File exists"
    ), proc.stderr


@pytest.mark.parametrize(
    "value, message",
    [
        ("[::1", "an IPv6 address must be in brackets (e.g. [::1]:7650), got '[::1'"),
        ("::1]:7650", "an IPv6 address must be in brackets (e.g. [::1]:7650), got '::1]:7650'"),
        ("a b:7650", "host must be an IP address or a host name, got 'a b'"),
        ("127.0.0.1:0", "port must be 1-65535, got 0"),
    ],
)
def test_chat_refuses_a_malformed_server_address(tmp_path, capsys, value, message):
    """'[::1' was looked up as a host name ('cannot reach [::1: Name or service not
    known'), '::1]:7650' as the host '::1' (the brackets stripped)."""
    profile = str(tmp_path / "chat.json")
    assert main(["chat", "--server", value, "--profile", profile, "register", "491701234567"]) == 1
    assert capsys.readouterr().err == f"pigeon chat: --server: {message}\n"


def test_admin_provision_refuses_too_few_iterations(tmp_path, capsys):
    """--iterations 0 went up as scramp's ScramException."""
    out = tmp_path / "creds.jsonl"
    args = ["admin", "provision", "--data-dir", str(tmp_path / "data"), "--count", "1"]
    assert main([*args, "--out", str(out), "--iterations", "0"]) == 2
    assert capsys.readouterr().err == (
        "pigeon admin provision: --iterations must be at least 4096 (RFC 7677), got 0\n"
    )
    assert not out.exists()
