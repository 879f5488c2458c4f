"""TLS certificates for a SuperLink and authentication keys for SuperNodes, made with `cryptography`.

Good for trying a deployment and for tests. In production use certificates from your own CA
(or a public one) and keep each SuperNode's private key on that node only.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA every client trusts, and the SuperLink's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private_key(key: ec.EllipticCurvePrivateKey, path: Path, encoding_format) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, encoding_format, serialization.NoEncryption()))
    path.chmod(0o600)


def generate_certificates(
    folder: str | Path, hosts: tuple[str, ...] = (LOOPBACK, "localhost"), days: int = 30
) -> Certificates:
    """A self-signed CA and a SuperLink certificate it signs, valid for `hosts` (IPs or DNS names).

    For a real deployment list the SuperLink's public name or IP in `hosts`; clients verify it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
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
    certificates.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certificates.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private_key(server_key, certificates.server_key, serialization.PrivateFormat.TraditionalOpenSSL)
    return certificates


def generate_node_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (NIST P-384, OpenSSH format): (private, public).

    The public key is registered with `flwr supernode register`; the private key stays on the node.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private_key(key, private, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public
