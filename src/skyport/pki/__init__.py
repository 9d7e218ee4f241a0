"""Certificate authority: issuing and reading Sky Port certificates (DESIGN.md §7)."""

from skyport.pki.authority import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    SUBJECT_USER_ID_OID,
    USER_URI_PREFIX,
    CertIdentity,
    CertificateAuthority,
    IssuedCertificate,
    PrivateKey,
    PublicKey,
    cert_to_pem,
    generate_key,
    identity_from_certificate,
    key_to_pem,
    make_csr,
    server_names,
    write_private,
)

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "SUBJECT_USER_ID_OID",
    "USER_URI_PREFIX",
    "CertIdentity",
    "CertificateAuthority",
    "IssuedCertificate",
    "PrivateKey",
    "PublicKey",
    "cert_to_pem",
    "generate_key",
    "identity_from_certificate",
    "key_to_pem",
    "make_csr",
    "server_names",
    "write_private",
]
