"""Users and their roles."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Role = Literal["user", "admin"]


def _default_roles() -> list[Role]:
    return ["user"]


class User(BaseModel):
    id: str
    name: str
    roles: list[Role] = Field(default_factory=_default_roles)
    accounts: list[str] = Field(default_factory=list)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class Account(BaseModel):
    """Who pays: its members' jobs are charged to it. ``share`` is its fair-share weight, ``usage`` its
    recent use in CPU-seconds (decayed), ``budget`` what it may spend (None: no limit)."""

    name: str
    share: float = 1.0
    usage: float = 0.0
    budget: float | None = None
    members: list[str] = Field(default_factory=list)
