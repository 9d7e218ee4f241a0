"""Identity and authorization: every decision about who may do what is made here, nowhere else.

Identity comes from the client certificate the TLS layer verified against our CA. A certificate names
its user (our SAN URI, or the original clients' subject attribute 2.5.29.17); it must also be one we
issued and recorded, and not revoked. Lookups are cached briefly; revoking through this core clears
the cache at once.

Without a certificate, an API token (``skyport token create``) identifies the caller: as a bearer token
(``Authorization: Bearer skp_...``) or as the password of HTTP basic auth with the user's name (what
TES clients such as py-tes and Snakemake send). A token must exist, belong to that user, be neither
revoked nor expired (expiry is checked on every request, cached or not), and its scopes must allow the
path. Secrets are never logged or kept: the cache is keyed by their SHA-256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection

from skyport.models import User
from skyport.pki import identity_from_certificate, node_id_from_certificate
from skyport.server.clock import Clock
from skyport.server.store import tokens as token_store
from skyport.server.store import users as user_store
from skyport.server.store.engine import Store
from skyport.server.store.enrolment import Enrolment
from skyport.server.tls import peer_certificate

CACHE_SECONDS = 5.0
#: ``used_at`` of a token is written at most this often (not on every request).
USED_AT_EVERY = timedelta(minutes=1)
#: Paths a token with only the ``tes`` scope may use.
TES_PREFIX = "/ga4gh/tes/"


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    user: User
    via: str  # "certificate" | "token"
    #: The API token the request came with (signing key of its TES callbacks), if any.
    token_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.user.is_admin


class Authenticator:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock
        # Keyed by the certificate's DER bytes: a hit costs a dict lookup, not an X.509 parse.
        self._cache: dict[bytes, tuple[float, Principal]] = {}
        # Keyed by the SHA-256 of the secret: (cache expiry, the token, its user).
        self._tokens: dict[str, tuple[float, token_store.ApiToken, Principal]] = {}

    def forget(self) -> None:
        """Drop every cached identity (after a revocation or a role change)."""
        self._cache.clear()
        self._tokens.clear()

    async def authenticate(self, scope: Mapping[str, Any]) -> Principal:
        der = peer_certificate(scope)
        if der is None:
            credentials = _credentials(scope)
            if credentials is None:
                raise AuthError(
                    401,
                    "a client certificate or an API token is required: create a certificate with "
                    "`skyport user add NAME` on the core host, or a token with `skyport token create`",
                )
            return await self._token_principal(scope, *credentials)
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

    async def _token_principal(
        self, scope: Mapping[str, Any], user_name: str | None, secret: str
    ) -> Principal:
        key = hashlib.sha256(secret.encode()).hexdigest()
        now = self._clock.now()
        tick = self._clock.monotonic()
        cached = self._tokens.get(key)
        if cached is not None and cached[0] > tick:
            token, principal = cached[1], cached[2]
        else:
            found, user = await self._store.read(_token_and_user, secret)
            if found is None or user is None:
                raise AuthError(
                    401, "the API token is not known to this core: create one with `skyport token create`"
                )
            token = found
            principal = Principal(user=user, via="token", token_id=token.id)
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[key] = (tick + CACHE_SECONDS, token, principal)
            if token.valid_at(now) and (token.used_at is None or now - token.used_at > USED_AT_EVERY):
                await self._store.write(token_store.mark_used, token.id, now)
        if token.revoked_at is not None:
            raise AuthError(
                401, "the API token has been revoked: create a new one with `skyport token create`"
            )
        if token.expires_at is not None and now >= token.expires_at:
            raise AuthError(401, "the API token has expired: create a new one with `skyport token create`")
        if user_name is not None and user_name != principal.user.name:
            raise AuthError(401, "the API token does not belong to the user name given with it")
        if "api" not in token.scopes and not str(scope.get("path", "")).startswith(TES_PREFIX):
            raise AuthError(403, f"this token may only be used for {', '.join(token.scopes)} (scopes)")
        return principal


def _credentials(scope: Mapping[str, Any]) -> tuple[str | None, str] | None:
    """(user name or None, token secret) from a Bearer or Basic ``Authorization`` header, or None."""
    header = b""
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            header = value
            break
    kind, _, rest = header.decode("latin-1").strip().partition(" ")
    rest = rest.strip()
    if kind.lower() == "bearer" and rest:
        return None, rest
    if kind.lower() == "basic" and rest:
        try:
            decoded = base64.b64decode(rest, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(401, "the basic auth header is not valid base64 of user:token") from None
        user, sep, secret = decoded.partition(":")
        if not sep or not secret:
            raise AuthError(401, "basic auth needs your user name and an API token as the password")
        return user, secret
    return None


def _token_and_user(conn: Connection, /, secret: str) -> tuple[token_store.ApiToken | None, User | None]:
    token = token_store.find_by_secret(conn, secret)
    if token is None:
        return None, None
    return token, user_store.get_user(conn, user_id=token.user_id)


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


# -- node agents -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePrincipal:
    """A node agent, as its certificate names it. It may act only on its own node's jobs."""

    node_id: str
    node_name: str
    remote_id: str


async def authenticate_node(
    scope: Mapping[str, Any], identify: Callable[[str], Awaitable[Enrolment | None]]
) -> NodePrincipal:
    """The node whose agent certificate the TLS layer verified; the node must still be known."""
    der = peer_certificate(scope)
    found = node_id_from_certificate(der) if der is not None else None
    if found is None:
        raise AuthError(401, "a node certificate is required: enrol the agent with a bootstrap token")
    granted = await identify(found[0])
    if granted is None:
        raise AuthError(401, "this node is no longer known to the core: enrol it again")
    return NodePrincipal(granted.node_id, granted.node_name, granted.remote_id)


def may_touch_job(node: NodePrincipal, job_node_ids: list[str] | None) -> bool:
    """An agent may fetch inputs, send outputs and report only for jobs placed on its own node."""
    return node.node_id in (job_node_ids or [])
