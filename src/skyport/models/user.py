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
    #: What its jobs' elastic capacity has cost so far (flavor price x node-hours).
    spend: float = 0.0
    members: list[str] = Field(default_factory=list)


class AccountCost(BaseModel):
    """An account's spend on elastic capacity: in total, and by its jobs that ended in the period asked."""

    account: str
    spend: float
    budget: float | None = None
    budget_left: float | None = None
    jobs_cost: float = 0.0


class JobCost(BaseModel):
    id: str
    name: str
    owner: str
    account: str
    remote: str = ""
    flavor: str = ""
    state: str
    cost: float


class Costs(BaseModel):
    accounts: list[AccountCost]
    jobs: list[JobCost]
