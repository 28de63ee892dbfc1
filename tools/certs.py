"""``pigeon admin gen-cert``: a self-signed certificate for development and tests.

Made with the ``cryptography`` library: an ECDSA P-256 key and an X.509
certificate whose subject alternative names cover the given host names and
addresses (default: localhost, 127.0.0.1 and ::1).  Production servers use
a certificate from a real CA; point ``tls-cert`` / ``tls-key`` at it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re

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


def gen_cert(
    out_dir: str, names=DEFAULT_NAMES, days: int = 365, force: bool = False
) -> tuple[str, str]:
    """Write ``key.pem`` (mode 0600) and ``cert.pem`` (mode 0644: a certificate is
    public) into out_dir (made 0700 if missing), whatever the umask; returns
    their paths (cert, key)."""
    if not 1 <= days <= MAX_DAYS:  # past it timedelta overflows, or the year passes 9999
        raise ValueError(f"--days must be 1-{MAX_DAYS}, got {days}")
    names = list(names)
    if not names:
        raise ValueError("give at least one --name")
    sans = [_san(n) for n in names]  # a bad one is refused before anything is written
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    cert_path = os.path.join(out_dir, "cert.pem")
    key_path = os.path.join(out_dir, "key.pem")
    for p in (cert_path, key_path):
        if os.path.exists(p) and not force:
            raise FileExistsError(f"{p} exists; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
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
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    os.chmod(key_path, 0o600)  # an existing file keeps its mode through O_CREAT
    fd = os.open(cert_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)  # not the umask's choice: clients read it
    return cert_path, key_path
