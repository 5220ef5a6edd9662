"""API bodies for the NBD export ACL: which clients may open a LUN over NBD."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Access = Literal["ro", "rw"]

CLIENT_HELP = (
    "cert:NAME (TLS certificate subject CN or SAN), net:ADDRESS[/PREFIX] (TCP source "
    "range, IPv4 or IPv6) or uid:N (Unix-socket peer uid)"
)


class NbdAccessEntry(BaseModel):
    client: str = Field(description=CLIENT_HELP)
    access: Access = Field(default="rw", description="ro: offered read-only, writes refused")


class NbdAccessInfo(BaseModel):
    lun: str
    open: bool = Field(description="no entry: any NBD client may open the LUN")
    entries: list[NbdAccessEntry]
