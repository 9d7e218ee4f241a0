"""API tokens, ``/api/v1/tokens``: create (the secret is shown once), list, revoke.

Tokens are made with a client certificate, never with another token: a leaked token cannot mint itself
a longer-lived successor. Users manage their own; administrators anyone's. Revocation takes effect at
once on this core (the authenticator's cache is cleared).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from skyport.server.api.deps import get_core, get_principal
from skyport.server.auth import AuthError, Principal
from skyport.server.core import Core
from skyport.server.store import tokens as token_store
from skyport.server.store import users as user_store

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])

CoreDep = Annotated[Core, Depends(get_core)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
#: Longest life a token may be given; tokens that never expire must be asked for explicitly (0 days).
MAX_DAYS = 3650


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=128, description="what it is for, e.g. 'snakemake on laptop'")
    scopes: list[str] = Field(default_factory=lambda: ["api"], description="api (everything) or tes")
    expires_days: float = Field(default=30, ge=0, le=MAX_DAYS, description="0: never expires")
    user: str | None = Field(default=None, description="for another user (administrators)")


class TokenInfo(BaseModel):
    id: str
    user: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    used_at: datetime | None


class NewToken(TokenInfo):
    #: The secret, shown this once: the core keeps only its hash.
    secret: str


def _info(token: token_store.ApiToken) -> TokenInfo:
    return TokenInfo(
        id=token.id,
        user=token.user_name,
        name=token.name,
        scopes=token.scopes,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        used_at=token.used_at,
    )


@router.post("", status_code=201, response_model=NewToken, summary="Create an API token")
async def create_token(request: TokenRequest, core: CoreDep, principal: PrincipalDep) -> NewToken:
    if principal.via != "certificate":
        raise AuthError(403, "tokens are created with a client certificate, not with another token")
    bad = [s for s in request.scopes if s not in token_store.SCOPES]
    if bad or not request.scopes:
        raise HTTPException(400, f"scopes must be some of {', '.join(token_store.SCOPES)}")
    user = principal.user
    if request.user is not None and request.user != user.name:
        if not principal.is_admin:
            raise AuthError(403, "only administrators create tokens for other users")
        found = await core.store.read(user_store.get_user, name=request.user)
        if found is None:
            raise HTTPException(404, f"no user {request.user!r}")
        user = found
    now = core.clock.now()
    expires = now + timedelta(days=request.expires_days) if request.expires_days else None
    token, secret = await core.store.write(
        token_store.create_token,
        user_id=user.id,
        name=request.name,
        scopes=sorted(set(request.scopes)),
        expires_at=expires,
        now=now,
    )
    return NewToken(**_info(token).model_dump(), secret=secret)


@router.get("", response_model=list[TokenInfo], summary="API tokens: yours (administrators: all=true)")
async def list_tokens(
    core: CoreDep, principal: PrincipalDep, all: Annotated[bool, Query()] = False
) -> list[TokenInfo]:
    if all and not principal.is_admin:
        raise AuthError(403, "only administrators list everyone's tokens")
    found = await core.store.read(token_store.list_tokens, None if all else principal.user.id)
    return [_info(t) for t in found]


@router.post("/{token_id}/revoke", response_model=TokenInfo, summary="Revoke an API token")
async def revoke_token(token_id: str, core: CoreDep, principal: PrincipalDep) -> TokenInfo:
    token = await core.store.read(token_store.get_token, token_id)
    if token is None or (token.user_id != principal.user.id and not principal.is_admin):
        raise HTTPException(404, f"no token {token_id} (or it is not yours)")
    revoked = await core.store.write(token_store.revoke_token, token_id, core.clock.now())
    core.auth.forget()
    assert revoked is not None
    return _info(revoked)
