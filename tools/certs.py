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
import re
import stat
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.fullmatch(name):  # what a client could match: no '[::1]', no 'a b'
        raise ValueError(
            f"--name must be a host name (ASCII: IDNA for others) or an IP address, got {name!r}"
        )
    return x509.DNSName(name)


#: The longest validity gen-cert makes: 100 years.
MAX_DAYS = 36500


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
            f"{out_dir} belongs to another user (uid {st.st_uid}): run gen-cert as that "
            "user (the server's user must be able to read the key), or use a directory of "
            "your own"
        )


def _write_new(directory: str, data: bytes, mode: int) -> str:
    """A new file in ``directory`` holding data with exactly ``mode`` (O_EXCL:
    never through a symlink planted there); its path, to rename into place."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".gen-cert-")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # not the umask's choice
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def gen_cert(
    out_dir: str, names=DEFAULT_NAMES, days: int = 365, force: bool = False
) -> tuple[str, str]:
    """Write ``key.pem`` (mode 0600) and ``cert.pem`` (mode 0644: a certificate is
    public) into out_dir (made 0700 if missing), whatever the umask; returns
    their paths (cert, key).  Refuses a directory other users can write or
    that belongs to another user; each file is written to a new temporary
    file and renamed into place, so an existing file (or a symlink in its
    place) is replaced, never written through."""
    if not 1 <= days <= MAX_DAYS:  # past it timedelta overflows, or the year passes 9999
        raise ValueError(f"--days must be 1-{MAX_DAYS}, got {days}")
    names = list(names)
    if not names:
        raise ValueError("give at least one --name")
    sans = [_san(n) for n in names]  # a bad one is refused before anything is written
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    _check_dir(out_dir)
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    for p in (cert_path, key_path):
        if os.path.lexists(p) and not force:
            raise FileExistsError(f"{p} exists; pass --force to replace it")
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # both written in full before either is renamed over what is there (which
    # replaces a symlink rather than following it): no half-new pair is left
    # by a failure, and the two renames are next to each other
    written = []
    try:
        written.append(_write_new(out_dir, key_pem, 0o600))
        # a certificate is public: clients read it to trust the server
        written.append(_write_new(out_dir, cert.public_bytes(serialization.Encoding.PEM), 0o644))
        os.replace(written[0], key_path)
        os.replace(written[1], cert_path)
    except BaseException:
        for tmp in written:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return cert_path, key_path
