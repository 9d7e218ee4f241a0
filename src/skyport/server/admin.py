"""Administration on the core's host: initialise ``$SKYPORT_HOME`` and register users.

These work directly on the home directory (the CA key and the store live there), with or without a
running core, like ``kadmin.local``. Revocation goes through the running core's API instead, so that
its identity cache drops the certificate at once.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from skyport.models import User
from skyport.pki import (
    CertificateAuthority,
    cert_to_pem,
    generate_key,
    key_to_pem,
    server_names,
    write_private,
)
from skyport.server.clock import Clock, SystemClock
from skyport.server.settings import SETTINGS_FILE, Settings
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store

ADMIN_USER = "admin"
CLIENT_FILE = "client.toml"
USER_CERT_DAYS = 365

#: Written by ``skyport init`` when the core runs as root: jobs then run as an unprivileged account.
ROOT_SETTINGS = """\
# Sky Port core settings. Every value can also be set with a SKYPORT_* environment variable
# (nested ones with a double underscore, e.g. SKYPORT_LOCAL__CPUS=8).

[local]
# The core runs as root: a job runs as the Unix account named like its Sky Port user, or as this
# account when there is none (never as root unless allow_root = true).
default_user = "nobody"
# Job working directories; the accounts jobs run as must be able to reach it.
workroot = "/var/lib/skyport/work"
"""

USER_SETTINGS = """\
# Sky Port core settings. Every value can also be set with a SKYPORT_* environment variable
# (nested ones with a double underscore, e.g. SKYPORT_LOCAL__CPUS=8).
# This core runs as an ordinary account: every job runs as that account.
"""


@dataclass(frozen=True)
class UserBundle:
    user: User
    directory: Path
    cert: Path
    key: Path
    ca: Path


def user_dir(home: Path, name: str) -> Path:
    return home / "users" / name


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _write_bundle(directory: Path, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, ca_name: str) -> None:
    _private_dir(directory)
    for name in ("cert.pem", "key.pem", ca_name):
        (directory / name).unlink(missing_ok=True)
    write_private(directory / "key.pem", key_pem)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / ca_name).write_bytes(ca_pem)


async def issue_user_bundle(
    settings: Settings, store: Store, clock: Clock, user: User, *, swm_dir: Path | None = None
) -> UserBundle:
    """A new key and certificate for ``user``, recorded in the store, written to their bundle directory.

    The key is generated here, on the core's host, and written only to files readable by their owner.
    """
    ca = CertificateAuthority.load(settings.ca_dir)
    key = generate_key()
    cert = ca.issue_user(user.id, user.name, key.public_key(), days=USER_CERT_DAYS)
    now = clock.now()
    await store.write(
        user_store.record_certificate,
        serial=cert.serial_number,
        user_id=user.id,
        fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        issued=now,
        expires=now + timedelta(days=USER_CERT_DAYS),
    )
    directory = user_dir(settings.home, user.name)
    cert_pem, key_pem = cert_to_pem(cert), key_to_pem(key)
    _write_bundle(directory, cert_pem, key_pem, ca.cert_pem, ca_name="ca.pem")
    if swm_dir is not None:
        # The original clients' layout: ~/.swm/cert.pem, key.pem, and the CA chain they verify against.
        _write_bundle(swm_dir, cert_pem, key_pem, ca.cert_pem, ca_name="ca-chain-cert.pem")
    return UserBundle(user, directory, directory / "cert.pem", directory / "key.pem", directory / "ca.pem")


async def add_user(
    settings: Settings,
    name: str,
    *,
    admin: bool = False,
    swm_dir: Path | None = None,
    clock: Clock | None = None,
) -> UserBundle:
    """Register a user and write their certificate bundle. Raises AlreadyExists for a taken name."""
    clock = clock or SystemClock()
    store = Store(settings.store_url)
    try:
        await store.migrate()
        user = await store.write(user_store.add_user, name, admin=admin, now=clock.now())
        return await issue_user_bundle(settings, store, clock, user, swm_dir=swm_dir)
    finally:
        await store.close()


@dataclass(frozen=True)
class InitReport:
    home: Path
    created: list[str]


async def init_home(settings: Settings, *, port: int | None = None, clock: Clock | None = None) -> InitReport:
    """Make ``$SKYPORT_HOME`` ready to run a core. Idempotent: what exists is kept as it is."""
    clock = clock or SystemClock()
    home = settings.home
    created: list[str] = []
    _private_dir(home)
    settings_file = home / SETTINGS_FILE
    if not settings_file.exists():
        settings_file.write_text(ROOT_SETTINGS if os.geteuid() == 0 else USER_SETTINGS)
        created.append(f"settings {settings_file}")
        settings = Settings(home=home)
    if not settings.ca_cert.exists():
        _private_dir(settings.ca_dir)
        CertificateAuthority.create(settings.ca_dir)
        created.append(f"certificate authority {settings.ca_cert}")
    ca = CertificateAuthority.load(settings.ca_dir)
    if not settings.server_cert.exists():
        names, ips = server_names()
        issued = ca.issue_server(names, ips)
        _private_dir(settings.server_cert.parent)
        settings.server_key.unlink(missing_ok=True)
        write_private(settings.server_key, issued.key_pem)
        settings.server_cert.write_bytes(issued.cert_pem)
        created.append(f"server certificate for {', '.join(names + ips)}")
    store = Store(settings.store_url)
    try:
        await store.migrate()
        admin = await store.read(user_store.get_user, name=ADMIN_USER)
        if admin is None:
            admin = await store.write(user_store.add_user, ADMIN_USER, admin=True, now=clock.now())
        if not (user_dir(home, ADMIN_USER) / "cert.pem").exists():
            await issue_user_bundle(settings, store, clock, admin)
            created.append(f"admin user with certificate in {user_dir(home, ADMIN_USER)}")
    finally:
        await store.close()
    client_file = home / CLIENT_FILE
    if not client_file.exists():
        client_file.write_text(f'url = "https://localhost:{port or settings.port}"\nuser = "{ADMIN_USER}"\n')
        created.append(f"client settings {client_file}")
    return InitReport(home=home, created=created)


def certificate_user_name(cert_file: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
