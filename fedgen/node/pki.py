"""Keys and certificates for site nodes and the aggregator (``cryptography`` only).

Site nodes authenticate to the aggregator with an ECDSA key pair in OpenSSH format (what
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read);
the aggregator serves TLS with a certificate issued by the study's CA (``nodes/make-certs.sh``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fedgen.errors import FedgenError

#: Curve of site node keys (Flower accepts NIST curves; P-384 is what its docs use).
NODE_KEY_CURVE = "secp384r1"


class PkiError(FedgenError):
    """A key or certificate is missing, unreadable or unsuitable."""


# ---------------------------------------------------------------- node keys


def generate_node_key(private_key: Path, public_key: Path, *, comment: str = "") -> str:
    """Create an ECDSA P-384 key pair in OpenSSH format; return the public key's fingerprint.

    The private key file is created with mode 0600 and never overwritten.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private_key, public_key = Path(private_key), Path(public_key)
    for p in (private_key, public_key):
        if p.exists():
            raise PkiError(f"{p} already exists; not overwriting a key")
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        pub += b" " + comment.encode()
    private_key.parent.mkdir(parents=True, exist_ok=True)
    public_key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    public_key.write_bytes(pub + b"\n")
    os.chmod(public_key, 0o644)
    return fingerprint_public_key(public_key)


def load_node_private_key(path: Path):  # -> ec.EllipticCurvePrivateKey
    """Load a node's OpenSSH EC private key as the SuperNode will; raise PkiError if unusable."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    path = Path(path)
    data = _read(path, "private key")
    try:
        key = load_ssh_private_key(data, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not an unencrypted OpenSSH private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: not an ECDSA key (Flower node authentication needs ECDSA, e.g. P-384)")
    return key


def load_node_public_key(path: Path):  # -> ec.EllipticCurvePublicKey
    """Load a node's OpenSSH EC public key as ``flwr supernode register`` will."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    path = Path(path)
    data = _read(path, "public key")
    try:
        key = load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"{path}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PkiError(f"{path}: not an ECDSA public key")
    return key


def public_key_openssh(key) -> bytes:  # noqa: ANN001 - an EC public key
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint_public_key(path: Path) -> str:
    """OpenSSH-style fingerprint (``SHA256:...``) of an OpenSSH public key file."""
    return fingerprint(load_node_public_key(path))


def fingerprint(public_key) -> str:  # noqa: ANN001 - an EC public key
    blob = base64.b64decode(public_key_openssh(public_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_pair_matches(private_key: Path, public_key: Path) -> bool:
    priv = load_node_private_key(private_key)
    pub = load_node_public_key(public_key)
    return public_key_openssh(priv.public_key()) == public_key_openssh(pub)


def loose_permissions(path: Path) -> str | None:
    """Describe group/other access to a secret file (None if only the owner can read it)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"mode {stat.S_IMODE(mode):04o} (readable beyond its owner; chmod 600 {path})"
    return None


# ---------------------------------------------------------------- certificates


@dataclass
class CertInfo:
    path: Path
    subject: str
    issuer: str
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    names: list[str]

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).total_seconds() / 86400.0


def load_certificates(path: Path) -> list:  # list[x509.Certificate]
    """Every certificate in a PEM file (a CA bundle may hold several)."""
    from cryptography import x509

    path = Path(path)
    data = _read(path, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate ({exc})") from None
    if not certs:
        raise PkiError(f"{path}: no certificate in file")
    return certs


def cert_info(cert, path: Path) -> CertInfo:  # noqa: ANN001 - x509.Certificate
    from cryptography import x509

    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bool(bc.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n.value) for n in san]
    except x509.ExtensionNotFound:
        names = []
    return CertInfo(
        path=Path(path),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        names=names,
    )


def read_cert_info(path: Path) -> list[CertInfo]:
    return [cert_info(c, path) for c in load_certificates(path)]


def cert_matches_key(cert_path: Path, key_path: Path) -> bool:
    """Whether the first certificate in ``cert_path`` belongs to the PEM private key ``key_path``."""
    from cryptography.hazmat.primitives import serialization

    cert = load_certificates(cert_path)[0]
    data = _read(Path(key_path), "private key")
    try:
        key = serialization.load_pem_private_key(data, None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{key_path}: not an unencrypted PEM private key ({exc})") from None
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def verify_issued_by(cert_path: Path, ca_path: Path) -> bool:
    """Whether the first certificate in ``cert_path`` is signed by a certificate in ``ca_path``."""
    cert = load_certificates(cert_path)[0]
    for ca in load_certificates(ca_path):
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature and friends
            continue
        return True
    return False


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise PkiError(f"{path}: is a folder, expected a {what} file") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read {what} ({exc.strerror})") from None
