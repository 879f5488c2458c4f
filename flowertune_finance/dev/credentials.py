"""TLS certificates for a SuperLink and authentication keys for SuperNodes, made with `cryptography`.

Good for trying a deployment and for tests. In production use certificates from your own CA
(or a public one) and keep each SuperNode's private key on that node only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"
PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644  # certificates and public keys (the umask may narrow it)


class CredentialError(RuntimeError):
    """A credential file is in the way (exists already, or is a symlink) or could not be written safely."""


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA every client trusts, and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _refuse_existing(paths: list[Path]) -> None:
    """Stop before writing anything when a target exists: never overwrite a key or what belongs to it."""
    for path in paths:
        if path.is_symlink():
            raise CredentialError(f"{path} is a symlink; refusing to write a credential through it (remove it first)")
        if path.exists():
            raise CredentialError(
                f"{path} already exists; refusing to overwrite it (move it away, or choose another folder)"
            )


def _create_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` from its first byte: `O_EXCL` never replaces an existing file,
    `O_NOFOLLOW` never writes through a symlink, and the mode is set at creation, not after."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as error:  # also a symlink, dangling or not: O_EXCL does not follow it
        kind = "a symlink" if path.is_symlink() else "an existing file"
        raise CredentialError(f"{path} is {kind}; refusing to overwrite it or write through it") from error
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _write_private_key(key: ec.EllipticCurvePrivateKey, path: Path, encoding_format) -> None:
    """An unencrypted private key, readable by its owner only (0600) from the moment it exists."""
    data = key.private_bytes(serialization.Encoding.PEM, encoding_format, serialization.NoEncryption())
    _create_file(path, data, PRIVATE_KEY_MODE)


def existing_certificates(folder: str | Path) -> Certificates | None:
    """The certificates `generate_certificates` wrote into `folder` before, or None if there are none.

    A partial set is an error: it cannot be used, and completing it would mix two CAs.
    """
    folder = Path(folder)
    certificates = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    paths = [certificates.ca_cert, certificates.server_cert, certificates.server_key]
    present = [path for path in paths if path.exists() or path.is_symlink()]
    if not present:
        return None
    if len(present) < len(paths) or any(path.is_symlink() for path in paths):
        raise CredentialError(
            f"{folder} holds an incomplete or symlinked certificate set ({', '.join(p.name for p in present)}); "
            "remove it or choose another folder"
        )
    return certificates


def generate_certificates(
    folder: str | Path, hosts: tuple[str, ...] = (LOOPBACK, "localhost"), days: int = 30
) -> Certificates:
    """A self-signed CA and a SuperLink certificate it signs, valid for `hosts` (IPs or DNS names).

    For a real deployment list the SuperLink's public name or IP in `hosts`; clients verify it.
    Raises CredentialError if any of the three files exists already (or is a symlink).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_existing([folder / "ca.crt", folder / "server.pem", folder / "server.key"])
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flowertune-finance local CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    certificates = Certificates(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    _write_private_key(server_key, certificates.server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    _create_file(certificates.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
    _create_file(certificates.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE_MODE)
    return certificates


def generate_node_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (NIST P-384, OpenSSH format): (private, public).

    The public key is registered with `flwr supernode register`; the private key stays on the node.
    Raises CredentialError if either file exists already (or is a symlink): keys are never replaced.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    private, public = folder / name, folder / f"{name}.pub"
    _refuse_existing([private, public])
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private_key(key, private, serialization.PrivateFormat.OpenSSH)
    public_bytes = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _create_file(public, public_bytes, PUBLIC_FILE_MODE)
    return private, public
