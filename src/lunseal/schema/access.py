"""API bodies for API tokens (secrets go out once, on creation) and the audit trail."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

RoleName = Literal["admin", "operator", "monitor"]


class TokenCreate(BaseModel):
    name: str = Field(description="1-64 letters, digits, '.', '_' or '-'")
    role: RoleName


class TokenInfo(BaseModel):
    name: str
    role: RoleName
    created_at: float
    last_used: float | None = Field(description="within a minute; null if never used")


class TokenCreated(TokenInfo):
    secret: str = Field(description="the bearer token: shown this once, stored only hashed")


class AuditEntry(BaseModel):
    seq: int
    at: float = Field(description="seconds since the epoch")
    actor: str = Field(description="API token name, 'iscsi:IQN', or '-' when unauthenticated")
    action: str = Field(description="'METHOD /route' or the in-band command")
    target: str = Field(description="what it named (route parameters, LUN)")
    result: str = Field(description="HTTP status, or ok / the error of an in-band command")
    detail: str = ""
