"""fleetlog.gateway.tls.server_context (the wss:// round trip is in test_e2e_auth_v2)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleetlog.gateway.tls import server_context


def _self_signed(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_no_certificate_means_plain_ws() -> None:
    assert server_context(None, None) is None


def test_a_server_context_with_the_certificate(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = server_context(cert, key)
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert not context.check_hostname, "a server does not check its clients' names"


def test_an_unreadable_or_mismatched_key_fails_at_start(tmp_path: Path) -> None:
    cert, _ = _self_signed(tmp_path)
    _, other_key = _self_signed(tmp_path / "other")
    with pytest.raises(ssl.SSLError):
        server_context(cert, other_key)
    with pytest.raises(FileNotFoundError):
        server_context(tmp_path / "missing.pem", tmp_path / "missing.key")
