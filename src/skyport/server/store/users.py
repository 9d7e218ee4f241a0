"""Users, accounts and the certificates issued to users."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from skyport.models import Account, User
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


def _user_accounts(conn: Connection, user_id: str) -> list[str]:
    rows = conn.execute(
        select(accounts.c.name)
        .join(account_members, account_members.c.account_id == accounts.c.id)
        .where(account_members.c.user_id == user_id)
        .order_by(accounts.c.name)
    )
    return [r.name for r in rows]


def _user(row: Any, account_names: list[str]) -> User:
    return User(id=row.id, name=row.name, roles=row.roles, accounts=account_names)


def get_user(conn: Connection, *, user_id: str | None = None, name: str | None = None) -> User | None:
    query = select(users)
    query = query.where(users.c.id == user_id) if user_id is not None else query.where(users.c.name == name)
    row = (conn.execute(query)).first()
    return _user(row, _user_accounts(conn, row.id)) if row else None


def list_users(conn: Connection) -> list[User]:
    rows = (conn.execute(select(users).order_by(users.c.name))).all()
    return [_user(r, _user_accounts(conn, r.id)) for r in rows]


def ensure_account(conn: Connection, name: str, now: datetime) -> str:
    row = (conn.execute(select(accounts.c.id).where(accounts.c.name == name))).first()
    if row:
        return str(row.id)
    account_id = str(uuid.uuid4())
    conn.execute(insert(accounts), {"id": account_id, "name": name, "budget": None, "created_at": now})
    return account_id


def account_id_by_name(conn: Connection, name: str) -> str | None:
    row = (conn.execute(select(accounts.c.id).where(accounts.c.name == name))).first()
    return str(row.id) if row else None


def add_user(conn: Connection, name: str, *, admin: bool, now: datetime) -> User:
    """A new user, member of the default account. Raises AlreadyExists for a taken name."""
    if (conn.execute(select(users.c.id).where(users.c.name == name))).first():
        raise AlreadyExists(f"a user named {name!r} already exists")
    user_id = str(uuid.uuid4())
    roles = ["user", "admin"] if admin else ["user"]
    conn.execute(insert(users), {"id": user_id, "name": name, "roles": roles, "created_at": now})
    account_id = ensure_account(conn, DEFAULT_ACCOUNT, now)
    conn.execute(insert(account_members), {"account_id": account_id, "user_id": user_id})
    return User.model_validate({"id": user_id, "name": name, "roles": roles, "accounts": [DEFAULT_ACCOUNT]})


def record_certificate(
    conn: Connection, *, serial: int, user_id: str, fingerprint: str, issued: datetime, expires: datetime
) -> None:
    conn.execute(
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


def get_certificate(conn: Connection, serial: int) -> CertificateRecord | None:
    row = (conn.execute(select(certificates).where(certificates.c.serial == format(serial, "x")))).first()
    if row is None:
        return None
    return CertificateRecord(row.serial, row.user_id, row.fingerprint, row.revoked_at is not None)


def revoke_user_certificates(conn: Connection, user_id: str, now: datetime) -> int:
    result = conn.execute(
        update(certificates)
        .where(certificates.c.user_id == user_id, certificates.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)


def revoke_certificates_of(conn: Connection, name: str, now: datetime) -> int | None:
    """Revoke every certificate of the user ``name``; None if there is no such user."""
    user = get_user(conn, name=name)
    return None if user is None else revoke_user_certificates(conn, user.id, now)


def _decayed(usage: float, since: datetime | None, now: datetime, half_life_s: float) -> float:
    if since is None or usage == 0.0:
        return usage
    elapsed = max(0.0, (now - since).total_seconds())
    return float(usage * 0.5 ** (elapsed / half_life_s))


@dataclass(frozen=True)
class AccountUsage:
    name: str
    share: float
    usage: float  # CPU-seconds, decayed to ``now``
    budget: float | None
    spend: float = 0.0  # what its jobs' elastic capacity has cost so far


# Built once: the scheduler reads the accounts on every pass and ended jobs are charged in every batch
# of job ends (see jobs._CURRENT_STATES for why).
_ACCOUNTS = select(accounts).order_by(accounts.c.name)
_USAGE = select(accounts.c.usage, accounts.c.usage_at).where(accounts.c.id == bindparam("b_id"))
_SET_USAGE = (
    update(accounts)
    .where(accounts.c.id == bindparam("b_id"))
    .values(usage=bindparam("b_usage"), usage_at=bindparam("b_at", type_=accounts.c.usage_at.type))
)


def account_usage(conn: Connection, now: datetime, half_life_s: float) -> list[AccountUsage]:
    """Every account's fair-share weight and recent use (decayed to ``now``)."""
    rows = conn.execute(_ACCOUNTS)
    return [
        AccountUsage(r.name, r.share, _decayed(r.usage, r.usage_at, now, half_life_s), r.budget, r.spend)
        for r in rows
    ]


def charge_usage(conn: Connection, charges: dict[str, float], now: datetime, half_life_s: float) -> None:
    """Add CPU-seconds to accounts (by id), decaying what they had to ``now`` first."""
    for account_id, cpu_seconds in charges.items():
        row = conn.execute(_USAGE, {"b_id": account_id}).first()
        if row is None:
            continue
        usage = _decayed(row.usage, row.usage_at, now, half_life_s) + cpu_seconds
        conn.execute(_SET_USAGE, {"b_id": account_id, "b_usage": usage, "b_at": now})


def create_account(conn: Connection, name: str, *, share: float, budget: float | None, now: datetime) -> None:
    """A new account. Raises AlreadyExists for a taken name."""
    if account_id_by_name(conn, name) is not None:
        raise AlreadyExists(f"an account named {name!r} already exists")
    conn.execute(
        insert(accounts),
        {
            "id": str(uuid.uuid4()),
            "name": name,
            "budget": budget,
            "share": share,
            "usage": 0.0,
            "created_at": now,
        },
    )


def update_account(conn: Connection, name: str, values: dict[str, Any]) -> bool:
    """Change an account's share and/or budget; False if there is no such account."""
    result = conn.execute(update(accounts).where(accounts.c.name == name).values(**values))
    return bool(result.rowcount)


def add_member(conn: Connection, account: str, user: str) -> str | None:
    """Make ``user`` a member of ``account``; None when done, else what is missing."""
    account_id = account_id_by_name(conn, account)
    member = get_user(conn, name=user)
    if account_id is None:
        return f"no account {account!r}"
    if member is None:
        return f"no user {user!r}"
    if account not in member.accounts:
        conn.execute(insert(account_members), {"account_id": account_id, "user_id": member.id})
    return None


def list_accounts(conn: Connection, now: datetime, half_life_s: float) -> list[Account]:
    members: dict[str, list[str]] = {}
    rows = conn.execute(
        select(accounts.c.name, users.c.name.label("user"))
        .join(account_members, account_members.c.account_id == accounts.c.id)
        .join(users, users.c.id == account_members.c.user_id)
        .order_by(users.c.name)
    )
    for row in rows:
        members.setdefault(row.name, []).append(row.user)
    return [
        Account(
            name=a.name,
            share=a.share,
            usage=a.usage,
            budget=a.budget,
            spend=a.spend,
            members=members.get(a.name, []),
        )
        for a in account_usage(conn, now, half_life_s)
    ]
