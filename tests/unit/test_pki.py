"""The built-in CA: what it writes, what it issues, and how identity is read back from certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyport.pki import (
    SUBJECT_USER_ID_OID,
    CertificateAuthority,
    cert_to_pem,
    generate_key,
    identity_from_certificate,
    key_to_pem,
    make_csr,
    server_names,
    write_private,
)

USER_ID = "0d6e3c5a-1111-4222-8333-944445555666"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca")


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def hand_made_client_cert(
    ca_dir: Path, subject: x509.Name, san: x509.SubjectAlternativeName | None
) -> x509.Certificate:
    """A client certificate built outside CertificateAuthority, to control exactly what it carries."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(generate_key().public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


# ---------------------------------------------------------------------------------------------------
# Files and keys


def test_create_writes_ca_with_private_key_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    """The CA key must be owner-only whatever the umask; the CA certificate is public."""
    old = os.umask(0)
    try:
        authority = CertificateAuthority.create(tmp_path / "new" / "ca")
    finally:
        os.umask(old)
    key_mode = stat.S_IMODE((tmp_path / "new" / "ca" / "ca-key.pem").stat().st_mode)
    assert key_mode == 0o600
    assert (tmp_path / "new" / "ca" / "ca.pem").read_bytes() == authority.cert_pem
    cert = authority.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Sky Port CA"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= lifetime <= dt.timedelta(days=3651)
    cert.verify_directly_issued_by(cert)  # self-signed, SHA-256 over P-256
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_create_refuses_to_overwrite_an_existing_ca(tmp_path: Path) -> None:
    first = CertificateAuthority.create(tmp_path)
    with pytest.raises(FileExistsError):
        CertificateAuthority.create(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == first.cert_pem


def test_write_private_makes_a_0600_file_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    old = os.umask(0)
    try:
        write_private(path, b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"secret"
    with pytest.raises(FileExistsError):
        write_private(path, b"other")


def test_key_pem_is_unencrypted_pkcs8_p256() -> None:
    """The original clients load an unencrypted key; PKCS#8 is what OpenSSL and Python both read."""
    pem = key_to_pem(generate_key())
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_load_round_trip_issues_certificates_the_original_ca_verifies(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.cert_pem == ca.cert_pem
    user = loaded.issue_user(USER_ID, "alice", generate_key().public_key())
    user.verify_directly_issued_by(ca.certificate)


def test_load_refuses_a_key_that_does_not_match_the_certificate(tmp_path: Path) -> None:
    CertificateAuthority.create(tmp_path / "a")
    CertificateAuthority.create(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "ca-key.pem", tmp_path / "a" / "ca-key.pem")
    with pytest.raises(ValueError, match="does not match"):
        CertificateAuthority.load(tmp_path / "a")


# ---------------------------------------------------------------------------------------------------
# User certificates and identity


def test_user_certificate_carries_both_identity_forms(ca: CertificateAuthority) -> None:
    key = generate_key()
    cert = ca.issue_user(USER_ID, "alice", key.public_key())

    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    # The original form: an RDN of the subject (not the extension) with OID 2.5.29.17.
    (rdn_attr,) = cert.subject.get_attributes_for_oid(SUBJECT_USER_ID_OID)
    assert rdn_attr.value == USER_ID
    assert rdn_attr.oid.dotted_string == "2.5.29.17"
    # Our form: SAN URI.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"skyport:user:{USER_ID}"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)

    identity = identity_from_certificate(der(cert))
    assert identity is not None
    assert (identity.user_id, identity.name, identity.serial) == (USER_ID, "alice", cert.serial_number)
    assert identity.fingerprint_sha256 == hashlib.sha256(der(cert)).hexdigest()
    assert identity.fingerprint_sha256 == cert.fingerprint(hashes.SHA256()).hex()


def test_serials_are_random_and_distinct(ca: CertificateAuthority) -> None:
    public_key = generate_key().public_key()
    serials = {ca.issue_user(USER_ID, "alice", public_key).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(s.bit_length() > 64 for s in serials)


def test_identity_from_subject_attribute_alone_like_the_original_clients(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "taras"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sky Workflows"),
            x509.NameAttribute(SUBJECT_USER_ID_OID, USER_ID),
        ]
    )
    cert = hand_made_client_cert(tmp_path / "ca", subject, san=None)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    identity = identity_from_certificate(der(cert))
    assert identity is not None
    assert (identity.user_id, identity.name) == (USER_ID, "taras")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_identity_from_a_certificate_made_by_openssl_the_original_way(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The original tooling put `subjectAltName = <id>` in the DN section of an `openssl req` config."""
    work = tmp_path / "openssl"
    work.mkdir()
    (work / "req.cnf").write_text(
        "[req]\nprompt = no\nencrypt_key = no\ndistinguished_name = name\n"
        f"[name]\ncommonName = taras\norganizationName = Sky Workflows\nsubjectAltName = {USER_ID}\n"
    )

    def openssl(command: str) -> None:  # paths relative to tmp_path, which holds ca/ and openssl/
        subprocess.run(
            ["openssl", *command.split()], cwd=tmp_path, check=True, capture_output=True, timeout=60
        )

    openssl(
        "req -new -newkey rsa:2048 -nodes -config openssl/req.cnf"
        " -keyout openssl/key.pem -out openssl/req.pem"
    )
    openssl(
        "x509 -req -in openssl/req.pem -days 1 -set_serial 4242 -CA ca/ca.pem -CAkey ca/ca-key.pem"
        " -out openssl/cert.pem"
    )
    cert = x509.load_pem_x509_certificate((work / "cert.pem").read_bytes())

    identity = identity_from_certificate(der(cert))
    assert identity is not None
    assert (identity.user_id, identity.name, identity.serial) == (USER_ID, "taras", 4242)


def test_identity_from_san_uri_alone(ca: CertificateAuthority, tmp_path: Path) -> None:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bob")])
    san = x509.SubjectAlternativeName(
        [
            x509.RFC822Name("bob@example.org"),
            x509.UniformResourceIdentifier("https://example.org/bob"),
            x509.UniformResourceIdentifier("skyport:user:u-bob"),
        ]
    )
    cert = hand_made_client_cert(tmp_path / "ca", subject, san)
    assert cert.subject.get_attributes_for_oid(SUBJECT_USER_ID_OID) == []

    identity = identity_from_certificate(der(cert))
    assert identity is not None
    assert (identity.user_id, identity.name) == ("u-bob", "bob")


def test_san_uri_wins_over_subject_attribute(ca: CertificateAuthority, tmp_path: Path) -> None:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "carol"),
            x509.NameAttribute(SUBJECT_USER_ID_OID, "from-rdn"),
        ]
    )
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("skyport:user:from-san")])
    identity = identity_from_certificate(der(hand_made_client_cert(tmp_path / "ca", subject, san)))
    assert identity is not None and identity.user_id == "from-san"


def test_no_identity_is_none_and_never_raises(ca: CertificateAuthority, tmp_path: Path) -> None:
    # A certificate with neither form (a server certificate), one with an empty SAN-URI id,
    # and bytes that are no certificate at all.
    server = x509.load_pem_x509_certificate(ca.issue_server(["localhost"], ["127.0.0.1"]).cert_pem)
    assert identity_from_certificate(der(server)) is None
    empty = hand_made_client_cert(
        tmp_path / "ca",
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]),
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier("skyport:user:")]),
    )
    assert identity_from_certificate(der(empty)) is None
    assert identity_from_certificate(b"") is None
    assert identity_from_certificate(b"\x30\x03\x02\x01\x00") is None
    assert identity_from_certificate(der(server)[:-10]) is None


# ---------------------------------------------------------------------------------------------------
# CSRs


def test_sign_csr_uses_our_subject_not_the_requesters(ca: CertificateAuthority) -> None:
    key = generate_key()
    csr = make_csr(key, "mallory")
    cert = ca.sign_csr(csr, USER_ID, "alice")
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    identity = identity_from_certificate(der(cert))
    assert identity is not None and (identity.user_id, identity.name) == (USER_ID, "alice")


def test_sign_csr_refuses_a_csr_with_a_bad_signature(ca: CertificateAuthority) -> None:
    """A CSR whose signature does not verify proves no possession of the key; it is refused."""
    csr = x509.load_pem_x509_csr(make_csr(generate_key(), "alice"))
    assert csr.is_signature_valid
    raw = bytearray(csr.public_bytes(serialization.Encoding.DER))
    raw[-1] ^= 0x01  # the last byte of the ECDSA signature's s value
    tampered = x509.load_der_x509_csr(bytes(raw))
    assert not tampered.is_signature_valid  # still parses: the check is ours to make
    with pytest.raises(ValueError, match="signature"):
        ca.sign_csr(tampered.public_bytes(serialization.Encoding.PEM), USER_ID, "alice")


def test_sign_csr_refuses_a_weak_rsa_key(ca: CertificateAuthority) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="too weak"):
        ca.sign_csr(make_csr(weak, "alice"), USER_ID, "alice")


def test_issue_user_accepts_an_rsa_key_like_the_original_clients(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = ca.issue_user(USER_ID, "alice", key.public_key())
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment


# ---------------------------------------------------------------------------------------------------
# Server certificates


def test_server_certificate_carries_every_name_and_address(ca: CertificateAuthority) -> None:
    names, ips = server_names()
    issued = ca.issue_server(names, ips)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert issued.serial == cert.serial_number

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(ip) for ip in ips]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=825) <= lifetime <= dt.timedelta(days=826)

    key = serialization.load_pem_private_key(issued.key_pem, password=None)
    assert key.public_key() == cert.public_key()


def test_server_names_cover_what_clients_dial() -> None:
    names, ips = server_names()
    short = socket.gethostname().split(".")[0]
    for expected in ("localhost", short, socket.getfqdn().rstrip(".")):
        assert expected.lower() in {n.lower() for n in names}
    assert len({n.lower() for n in names}) == len(names)  # no duplicates
    assert ips == ["127.0.0.1", "::1"]


def test_cert_to_pem_round_trips(ca: CertificateAuthority) -> None:
    cert = ca.issue_user(USER_ID, "alice", generate_key().public_key())
    assert x509.load_pem_x509_certificate(cert_to_pem(cert)) == cert
