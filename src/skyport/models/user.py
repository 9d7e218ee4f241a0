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
