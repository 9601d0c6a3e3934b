"""Credentials of a LocalCluster: a key and certificate held in memory only.

Dask's ``Security.temporary()`` makes an RSA-2048 key, which takes 0.05-0.1 s
of every build to generate and makes each of the cluster's TLS handshakes
sign with RSA. A P-256 key is generated in about a millisecond and gives the
same protection; the certificate is otherwise the one Dask makes (the name
``dask-internal``, valid a year, trusted as its own CA).
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distributed.security import Security


def temporary_security() -> Security:
    """A ``Security`` requiring TLS for every role, with a new self-signed
    key and certificate that exist only in this object (never on disk)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from distributed.security import Security

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(tz=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("dask-internal")]),
            critical=False,
        )
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clock skew
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return Security(
        require_encryption=True,
        tls_ca_file=cert_pem,
        tls_client_key=key_pem,
        tls_client_cert=cert_pem,
        tls_scheduler_key=key_pem,
        tls_scheduler_cert=cert_pem,
        tls_worker_key=key_pem,
        tls_worker_cert=cert_pem,
    )
