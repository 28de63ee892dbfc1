"""Files the server trusts: ``pigeon admin gen-cert`` writes them safely, and
``pigeon serve`` refuses a TLS key other users may read (naming the file
that is wrong) and a data directory that belongs to another user."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from serverutil import free_port

from pigeon.tools.certs import gen_cert
from pigeon.tools.cli import main


def test_gen_cert_replaces_a_planted_symlink_instead_of_writing_through_it(tmp_path, capsys):
    out = tmp_path / "tls"
    out.mkdir(mode=0o700)
    target = tmp_path / "victim.txt"
    target.write_bytes(b"keep me")
    target.chmod(0o644)
    (out / "key.pem").symlink_to(target)
    # a dangling link counts as a file in the way too
    (out / "cert.pem").symlink_to(tmp_path / "nowhere")
    assert main(["admin", "gen-cert", "--out-dir", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["admin", "gen-cert", "--out-dir", str(out), "--force"]) == 0
    assert target.read_bytes() == b"keep me"  # not overwritten through the link
    assert target.stat().st_mode & 0o777 == 0o644
    assert not (tmp_path / "nowhere").exists()
    for name, mode in (("key.pem", 0o600), ("cert.pem", 0o644)):
        p = out / name
        assert not p.is_symlink()
        assert p.stat().st_mode & 0o777 == mode
    assert b"PRIVATE KEY" in (out / "key.pem").read_bytes()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_gen_cert_force_gives_an_old_readable_key_a_new_private_file(tmp_path):
    out = tmp_path / "tls"
    cert, key = gen_cert(str(out))
    os.chmod(key, 0o644)
    old_inode = os.stat(key).st_ino
    fd = os.open(key, os.O_RDONLY)  # someone who opened the old, readable key
    try:
        gen_cert(str(out), force=True)
        assert os.stat(key).st_mode & 0o777 == 0o600
        assert os.stat(key).st_ino != old_inode
        # the new key never went into the file the old descriptor reads
        assert os.read(fd, 100000) != open(key, "rb").read()
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o722])
def test_gen_cert_refuses_a_directory_others_can_write(tmp_path, capsys, mode):
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(mode)
    assert main(["admin", "gen-cert", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} is writable by other users (mode {mode:04o})" in err
    assert "chmod 700" in err
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_gen_cert_refuses_a_directory_of_another_user(tmp_path, capsys):
    out = tmp_path / "theirs"
    out.mkdir(mode=0o700)
    os.chown(out, 65534, 65534)
    assert main(["admin", "gen-cert", "--out-dir", str(out)]) == 2
    assert "belongs to another user (uid 65534)" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("days", ["3000000", "999999999", "36501"])
def test_gen_cert_days_past_a_century_is_a_usage_error(tmp_path, capsys, days):
    """(3000000 was an OverflowError traceback: the year past 9999)"""
    out = tmp_path / "tls"
    assert main(["admin", "gen-cert", "--out-dir", str(out), "--days", days]) == 2
    assert f"--days must be 1-36500, got {days}" in capsys.readouterr().err
    assert not (out / "key.pem").exists()


def _serve(tmp_path, cert, key=None, timeout=60):
    """``pigeon serve`` with TLS on the given files; these cases must refuse to start."""
    args = [
        sys.executable, "-m", "pigeon.tools.cli", "serve",
        "--data-dir", str(tmp_path / "data"), "--workers", "1",
        "--listen", f"127.0.0.1:{free_port()}", "--tls-listen", f"127.0.0.1:{free_port()}",
        "--metrics-listen", "off", "--media-listen", "off", "--tls-cert", str(cert),
    ]  # fmt: skip
    if key:
        args += ["--tls-key", str(key)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # it started: end it and its workers
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("pigeon serve started instead of refusing") from None
    return proc.returncode, err


def test_serve_refuses_a_tls_key_others_can_read(tmp_path):
    cert, key = gen_cert(str(tmp_path / "tls"))
    os.chmod(key, 0o644)
    code, err = _serve(tmp_path, cert, key)
    assert code == 1
    assert f"tls-key {key} may be read or written by other users (mode 0644)" in err
    assert "Traceback" not in err
    # the key inside the certificate file is checked the same way
    both = tmp_path / "both.pem"
    both.write_bytes(open(cert, "rb").read() + open(key, "rb").read())
    both.chmod(0o640)
    code, err = _serve(tmp_path, both)
    assert code == 1
    assert f"tls-cert (with its key) {both} may be read or written by other users" in err


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners")
def test_a_root_owned_key_may_be_read_by_its_group():
    """Debian's ssl-cert convention (root:ssl-cert 0640) is accepted for a
    server that does not run as root; world-readable never is.  (A test run
    as root cannot read a file as someone else, so the rule is checked on
    the file's stat.)"""
    from pigeon.server.listeners import _key_mode_problem

    def st(uid, mode):
        return os.stat_result((0o100000 | mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))

    me = os.geteuid()
    assert _key_mode_problem(st(me, 0o600)) is None
    assert _key_mode_problem(st(me, 0o400)) is None
    assert "mode 0640" in _key_mode_problem(st(me, 0o640))
    if me != 0:
        assert _key_mode_problem(st(0, 0o640)) is None
        assert "chmod it 0640 or 0600 (root owns it)" in _key_mode_problem(st(0, 0o644))
        assert _key_mode_problem(st(0, 0o660)) is not None
    else:  # the server runs as root: its key is root's alone
        assert "chmod it 0600" in _key_mode_problem(st(0, 0o640))


def test_serve_names_the_tls_file_that_is_wrong(tmp_path):
    cert, key = gen_cert(str(tmp_path / "tls"))
    other_cert, other_key = gen_cert(str(tmp_path / "other"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    junk.chmod(0o600)
    cases = [
        (junk, key, f"tls-cert {junk} holds no PEM certificate"),
        (cert, junk, f"tls-key {junk} holds no PEM private key"),
        (
            cert,
            other_key,
            f"tls-key {other_key} is not the key of the certificate in tls-cert {cert}",
        ),  # fmt: skip
        (
            tmp_path / "missing.pem",
            key,
            f"cannot read tls-cert {tmp_path / 'missing.pem'}: No such file or directory",
        ),  # fmt: skip
    ]
    from cryptography.hazmat.primitives import serialization

    locked = tmp_path / "locked.pem"
    k = serialization.load_pem_private_key(open(key, "rb").read(), None)
    locked.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pw")))  # fmt: skip
    locked.chmod(0o600)
    cases.append((cert, locked, f"tls-key {locked} is protected by a passphrase"))
    for c, k_, message in cases:
        code, err = _serve(tmp_path, c, k_)
        assert code == 1, (c, k_, err)
        assert message in err, err
        assert "Traceback" not in err
    shutil.rmtree(tmp_path / "data", ignore_errors=True)


def _serve_args(tmp_path, *extra):
    return [
        sys.executable, "-m", "pigeon.tools.cli", "serve",
        "--data-dir", str(tmp_path / "data"), "--workers", "1",
        "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "off",
        "--media-listen", "off", *extra,
    ]  # fmt: skip


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX owners")
def test_serve_refuses_a_data_dir_of_another_user(tmp_path):
    """Its owner could read the store or swap files in it.  (The server is run
    with os.geteuid() saying 4242, as a test run as root cannot be someone
    else with this interpreter.)"""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    run_as = (
        "import os, sys\n"
        "os.geteuid = lambda: 4242\n"
        "from pigeon.tools.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [sys.executable, "-c", run_as] + _serve_args(tmp_path)[3:]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError("pigeon serve started instead of refusing") from None
    assert proc.returncode == 1, err
    owner = os.stat(data).st_uid
    assert f"the data directory {data} belongs to uid {owner}, not to the user the server " in err
    assert "(uid 4242)" in err and "Traceback" not in err
    assert list(data.iterdir()) == []  # nothing written into it


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_root_serves_a_data_dir_of_another_user_with_a_warning(tmp_path):
    """A container's root on a volume a host user owns works (a refusal broke
    it); the log says that what it makes there is root's."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    proc = subprocess.Popen(_serve_args(tmp_path, "--log-format", "json"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True)  # fmt: skip
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if '"worker ready"' in line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = "".join(lines)
    assert "the data directory belongs to another user than root" in text, text
    assert any('"worker ready"' in line for line in lines), text
