"""A small private CA for the bus: the broker's server certificate, one client certificate per identity, a CRL.

Keys are ECDSA P-256 (fast handshakes on gateways, accepted by OpenSSL 1.1+ in Mosquitto and
Python's ``ssl``). The client certificate's common name is the identity's username, which the
broker's ``use_identity_as_username`` turns into the MQTT username. Private keys are written
``0600``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = dt.timedelta(days=1)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created ``0600``, never world-readable in between)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class CertificateAuthority:
    """The CA's key and certificate, loaded from or saved to ``ca.key`` / ``ca.crt`` in one folder."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "megace bus CA", days: int = 3650) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - DAY)
            .not_valid_after(_now() + days * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, folder: Path) -> CertificateAuthority:
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{folder / 'ca.key'} is not an EC key")
        return cls(key, x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()))

    def save(self, folder: Path) -> None:
        write_private(folder / "ca.key", _key_pem(self.key))
        (folder / "ca.crt").write_bytes(_cert_pem(self.cert))

    def issue(self, common_name: str, *, server_names: Iterable[str] = (), days: int = 825,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A key and a certificate for ``common_name``: a server certificate when ``server_names`` is given
        (DNS names and IP addresses for the subject alternative name), else a client certificate."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        names = list(server_names)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - DAY)
            .not_valid_after(_now() + days * DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if names
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                                            critical=False)
        return key, builder.sign(self.key, hashes.SHA256())

    def crl(self, revoked_serials: Iterable[int], days: int = 30) -> x509.CertificateRevocationList:
        """A CRL listing ``revoked_serials``; Mosquitto's ``crlfile`` refuses those certificates.

        OpenSSL refuses every client certificate once the CRL is past ``next_update``: re-run
        ``megace provision crl`` (any provisioning command rewrites it) well before ``days`` run out.
        """
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(_now() - DAY).next_update(_now() + days * DAY))
        for serial in sorted(set(revoked_serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(_now() - DAY).build())
        return builder.sign(self.key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def save_pair(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
              chain: x509.Certificate | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.key`` (0600) and ``<stem>.crt`` (with ``chain`` appended, if given)."""
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.crt"
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(_cert_pem(cert) + (_cert_pem(chain) if chain is not None else b""))
    return key_path, cert_path


def save_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Write atomically: the broker may read the file at any reload."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def load_serial(cert_path: Path) -> int:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number


def signing_keypair(folder: Path, stem: str = "signing") -> tuple[Path, Path]:
    """An Ed25519 key pair for signing payloads (global adapters, uploads, downlinks: planned work).

    Separate from TLS: the transport key proves who is connected, this key will prove who made a
    payload even after a broker relays it. Writes ``<stem>.ed25519`` (PKCS#8 PEM, 0600) and
    ``<stem>.ed25519.pub`` (SubjectPublicKeyInfo PEM).
    """
    key = ed25519.Ed25519PrivateKey.generate()
    private = folder / f"{stem}.ed25519"
    public = folder / f"{stem}.ed25519.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
