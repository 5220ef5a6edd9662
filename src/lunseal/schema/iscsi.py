"""API bodies for the iSCSI target's initiator ACL: who may log in, with which
CHAP secrets, seeing which LUNs.  Secrets go in, never out."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Access = Literal["ro", "rw"]


class ChapBody(BaseModel):
    user: str = Field(description="CHAP name (CHAP_N)")
    secret: str = Field(description="at least 12 bytes (RFC 7143); never returned")


class InitiatorAllow(BaseModel):
    """Create an initiator, or change the parts given of an existing one."""

    all_luns: bool | None = Field(
        default=None,
        description="sees every LUN (the listed ones read-only); default: true unless "
        "luns are given",
    )
    luns: dict[str, Access] | None = Field(
        default=None, description="LUN name -> ro|rw; replaces the list"
    )
    chap: ChapBody | None = Field(default=None, description="the initiator must pass CHAP")
    mutual: ChapBody | None = Field(
        default=None, description="the target proves itself too (mutual CHAP)"
    )


class ChapSet(BaseModel):
    chap: ChapBody
    mutual: ChapBody | None = Field(default=None, description="null: no mutual CHAP")


class LunAccessSet(BaseModel):
    access: Access


class LunAccessInfo(BaseModel):
    lun: str
    number: int
    access: Access


class InitiatorInfo(BaseModel):
    name: str
    created_at: float
    all_luns: bool = Field(description="sees every LUN; luns lists the read-only ones")
    luns: list[LunAccessInfo]
    chap_user: str | None = Field(description="CHAP name it must log in with; null: no CHAP")
    mutual_user: str | None = Field(description="CHAP name the target answers with")


class IscsiInfo(BaseModel):
    target: str | None = Field(description="the target's iSCSI name; null: iSCSI is off")
    portal: str | None = Field(description="HOST:PORT the target listens on")
    open: bool = Field(description="no initiator configured: anyone may log in, no CHAP")
    initiators: list[InitiatorInfo]
