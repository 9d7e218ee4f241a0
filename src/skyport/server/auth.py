"""Identity and authorization: every decision about who may do what is made here, nowhere else.

Identity comes from the client certificate the TLS layer verified against our CA. A certificate names
its user (our SAN URI, or the original clients' subject attribute 2.5.29.17); it must also be one we
issued and recorded, and not revoked. Lookups are cached briefly; revoking through this core clears
the cache at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from skyport.models import User
from skyport.pki import identity_from_certificate
from skyport.server.clock import Clock
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.tls import peer_certificate

CACHE_SECONDS = 5.0


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    user: User
    via: str  # "certificate" | "token"

    @property
    def is_admin(self) -> bool:
        return self.user.is_admin


class Authenticator:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        # Keyed by the certificate's DER bytes: a hit costs a dict lookup, not an X.509 parse.
        self._cache: dict[bytes, tuple[float, Principal]] = {}

    def forget(self) -> None:
        """Drop every cached identity (after a revocation or a role change)."""
        self._cache.clear()

    async def authenticate(self, scope: Mapping[str, Any]) -> Principal:
        der = peer_certificate(scope)
        if der is None:
            raise AuthError(
                401,
                "a client certificate is required: create one with `skyport user add NAME` on the core host",
            )
        now = self._clock.monotonic()
        cached = self._cache.get(der)
        if cached is not None and cached[0] > now:
            return cached[1]
        identity = identity_from_certificate(der)
        if identity is None:
            raise AuthError(401, "the client certificate does not name a Sky Port user")
        record, user = await self._store.read(_certificate_and_user, identity.serial, identity.user_id)
        if record is None or user is None or record.user_id != identity.user_id:
            raise AuthError(401, "the client certificate is not registered with this core")
        if record.revoked:
            raise AuthError(
                401, "the client certificate has been revoked: ask an administrator for a new one"
            )
        principal = Principal(user=user, via="certificate")
        if len(self._cache) > 10_000:  # bounded: certificates are few, but never grow without limit
            self._cache.clear()
        self._cache[der] = (now + CACHE_SECONDS, principal)
        return principal


def _certificate_and_user(
    conn: Connection, serial: int, user_id: str
) -> tuple[user_store.CertificateRecord | None, User | None]:
    return user_store.get_certificate(conn, serial), user_store.get_user(conn, user_id=user_id)


# -- policy ------------------------------------------------------------------------------------------


def may_see_job(principal: Principal, owner: str) -> bool:
    """Users see and act on their own jobs; administrators on all."""
    return principal.is_admin or principal.user.name == owner


def owner_filter(principal: Principal) -> str | None:
    """The owner id a job listing is restricted to (None: everyone's, for administrators)."""
    return None if principal.is_admin else principal.user.id


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise AuthError(403, "this needs the admin role")
