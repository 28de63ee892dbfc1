"""``pigeon admin gen-cert``: a self-signed certificate for development and tests.

Made with the ``cryptography`` library: an ECDSA P-256 key and an X.509
certificate whose subject alternative names cover the given host names and
addresses (default: localhost, 127.0.0.1 and ::1).  Production servers use
a certificate from a real CA; point ``tls-cert`` / ``tls-key`` at it.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _check_dir(out_dir: str) -> None:
    """Refuse a directory another user could swap files in: the key is written
    there, and a writable directory lets its other writers replace key.pem
    under the server (or plant a symlink where it is written)."""
    st = os.stat(out_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{out_dir} is not a directory")
    if st.st_mode & 0o022:
        raise ValueError(
            f"{out_dir} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            "use a private directory (chmod 700) for the key"
        )
    uid = os.geteuid() if hasattr(os, "geteuid") else None
    if uid is not None and st.st_uid not in (uid, 0):
        raise ValueError(
            f"{out_dir} belongs to another user (uid {st.st_uid}); "
            "use a directory of your own for the key"
        )


def _write_private(directory: str, path: str, data: bytes, mode: int) -> None:
    """Write data to path atomically with exactly ``mode``: a new file made in
    the same directory (O_EXCL, so never through a symlink planted there) and
    renamed over path, which replaces a symlink rather than following it."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gen-cert-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # not the umask's choice
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def gen_cert(
    out_dir: str, names=DEFAULT_NAMES, days: int = 365, force: bool = False
) -> tuple[str, str]:
    """Write ``key.pem`` (mode 0600) and ``cert.pem`` (mode 0644: a certificate is
    public) into out_dir (made 0700 if missing), whatever the umask; returns
    their paths (cert, key).  Refuses a directory other users can write or
    that belongs to another user; each file is written to a new temporary
    file and renamed into place, so an existing file (or a symlink in its
    place) is replaced, never written through."""
    if days < 1:
        raise ValueError(f"--days must be at least 1, got {days}")
    names = list(names)
    if not names:
        raise ValueError("give at least one --name")
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    _check_dir(out_dir)
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    for p in (cert_path, key_path):
        if os.path.lexists(p) and not force:
            raise FileExistsError(f"{p} exists; pass --force to replace it")
    now = datetime.datetime.now(datetime.UTC)
    try:
        not_after = now + datetime.timedelta(days=days)
    except OverflowError:
        raise ValueError(f"--days {days} ends past the year 9999; give fewer days") from None
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(out_dir, key_path, key_pem, 0o600)
    # a certificate is public: clients read it to trust the server
    _write_private(out_dir, cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path
