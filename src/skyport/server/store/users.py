"""Users, accounts and the certificates issued to users."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from skyport.models import User
from skyport.server.store.tables import account_members, accounts, certificates, users

DEFAULT_ACCOUNT = "default"


class AlreadyExists(Exception):
    pass


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    user_id: str
    fingerprint: str
    revoked: bool


async def _user_accounts(conn: AsyncConnection, user_id: str) -> list[str]:
    rows = await conn.execute(
        select(accounts.c.name)
        .join(account_members, account_members.c.account_id == accounts.c.id)
        .where(account_members.c.user_id == user_id)
        .order_by(accounts.c.name)
    )
    return [r.name for r in rows]


def _user(row: Any, account_names: list[str]) -> User:
    return User(id=row.id, name=row.name, roles=row.roles, accounts=account_names)


async def get_user(
    conn: AsyncConnection, *, user_id: str | None = None, name: str | None = None
) -> User | None:
    query = select(users)
    query = query.where(users.c.id == user_id) if user_id is not None else query.where(users.c.name == name)
    row = (await conn.execute(query)).first()
    return _user(row, await _user_accounts(conn, row.id)) if row else None


async def list_users(conn: AsyncConnection) -> list[User]:
    rows = (await conn.execute(select(users).order_by(users.c.name))).all()
    return [_user(r, await _user_accounts(conn, r.id)) for r in rows]


async def ensure_account(conn: AsyncConnection, name: str, now: datetime) -> str:
    row = (await conn.execute(select(accounts.c.id).where(accounts.c.name == name))).first()
    if row:
        return str(row.id)
    account_id = str(uuid.uuid4())
    await conn.execute(insert(accounts), {"id": account_id, "name": name, "budget": None, "created_at": now})
    return account_id


async def account_id_by_name(conn: AsyncConnection, name: str) -> str | None:
    row = (await conn.execute(select(accounts.c.id).where(accounts.c.name == name))).first()
    return str(row.id) if row else None


async def add_user(conn: AsyncConnection, name: str, *, admin: bool, now: datetime) -> User:
    """A new user, member of the default account. Raises AlreadyExists for a taken name."""
    if (await conn.execute(select(users.c.id).where(users.c.name == name))).first():
        raise AlreadyExists(f"a user named {name!r} already exists")
    user_id = str(uuid.uuid4())
    roles = ["user", "admin"] if admin else ["user"]
    await conn.execute(insert(users), {"id": user_id, "name": name, "roles": roles, "created_at": now})
    account_id = await ensure_account(conn, DEFAULT_ACCOUNT, now)
    await conn.execute(insert(account_members), {"account_id": account_id, "user_id": user_id})
    return User(id=user_id, name=name, roles=roles, accounts=[DEFAULT_ACCOUNT])  # type: ignore[arg-type]


async def record_certificate(
    conn: AsyncConnection, *, serial: int, user_id: str, fingerprint: str, issued: datetime, expires: datetime
) -> None:
    await conn.execute(
        insert(certificates),
        {
            "serial": format(serial, "x"),
            "user_id": user_id,
            "fingerprint": fingerprint,
            "issued_at": issued,
            "expires_at": expires,
            "revoked_at": None,
        },
    )


async def get_certificate(conn: AsyncConnection, serial: int) -> CertificateRecord | None:
    row = (
        await conn.execute(select(certificates).where(certificates.c.serial == format(serial, "x")))
    ).first()
    if row is None:
        return None
    return CertificateRecord(row.serial, row.user_id, row.fingerprint, row.revoked_at is not None)


async def revoke_user_certificates(conn: AsyncConnection, user_id: str, now: datetime) -> int:
    result = await conn.execute(
        update(certificates)
        .where(certificates.c.user_id == user_id, certificates.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)
