"""API tokens (``kind='api'``): bearer secrets for TES clients, scripts and the web page.

A token is a 256-bit random secret shown once at creation; the store keeps only its SHA-256. Because the
secret is random (not a password), a plain hash is a safe lookup key and needs no slow KDF. A token
belongs to one user, may expire, and is revoked by setting ``revoked_at`` (rows are kept so that lists
show what existed). Bootstrap tokens for nodes live in another module; nothing here touches them.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update

from skyport.server.store.tables import tokens, users

KIND = "api"
#: Every API token starts so: recognisable in a leaked file, and told apart from other credentials.
PREFIX = "skp_"
#: What a token may be used for: the whole API (``api``), or only the GA4GH TES endpoints (``tes``).
SCOPES = ("api", "tes")


@dataclass(frozen=True)
class ApiToken:
    """A token as listed: never its secret."""

    id: str
    user_id: str
    user_name: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    used_at: datetime | None

    def valid_at(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def new_secret() -> str:
    """A fresh secret: the prefix and 32 random bytes, URL-safe (fits an HTTP header and a password)."""
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _token(row: Any) -> ApiToken:
    return ApiToken(
        id=row.id,
        user_id=row.user_id,
        user_name=row.user_name,
        name=row.name,
        scopes=list(row.scopes),
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        used_at=row.used_at,
    )


def _select() -> Any:
    return (
        select(tokens, users.c.name.label("user_name"))
        .join(users, users.c.id == tokens.c.user_id)
        .where(tokens.c.kind == KIND)
    )


def create_token(
    conn: Connection,
    *,
    user_id: str,
    name: str,
    scopes: list[str],
    expires_at: datetime | None,
    now: datetime,
) -> tuple[ApiToken, str]:
    """A new token for ``user_id``; returns it and its secret (the only time the secret exists)."""
    secret = new_secret()
    token_id = str(uuid.uuid4())
    conn.execute(
        insert(tokens),
        {
            "id": token_id,
            "kind": KIND,
            "secret_hash": secret_hash(secret),
            "user_id": user_id,
            "name": name,
            "scopes": scopes,
            "remote_id": None,
            "node_name": None,
            "created_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
            "used_at": None,
        },
    )
    token = get_token(conn, token_id)
    assert token is not None
    return token, secret


def get_token(conn: Connection, token_id: str) -> ApiToken | None:
    row = conn.execute(_select().where(tokens.c.id == token_id)).first()
    return _token(row) if row else None


def find_by_secret(conn: Connection, secret: str) -> ApiToken | None:
    """The API token with this secret, whatever its state (the caller checks validity)."""
    row = conn.execute(_select().where(tokens.c.secret_hash == secret_hash(secret))).first()
    return _token(row) if row else None


def list_tokens(conn: Connection, user_id: str | None) -> list[ApiToken]:
    """A user's tokens (None: everyone's), newest first, revoked ones included."""
    query = _select()
    if user_id is not None:
        query = query.where(tokens.c.user_id == user_id)
    rows = conn.execute(query.order_by(tokens.c.created_at.desc(), tokens.c.id))
    return [_token(r) for r in rows]


def revoke_token(conn: Connection, token_id: str, now: datetime) -> ApiToken | None:
    """Revoke a token (idempotent: the first revocation time is kept); None if there is no such token."""
    conn.execute(
        update(tokens)
        .where(tokens.c.id == token_id, tokens.c.kind == KIND, tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return get_token(conn, token_id)


def mark_used(conn: Connection, token_id: str, now: datetime) -> None:
    conn.execute(update(tokens).where(tokens.c.id == token_id).values(used_at=now))
