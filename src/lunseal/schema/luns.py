"""Request and response bodies of the management API for LUNs and the array."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code, e.g. not_found, invalid_argument")
    message: str


class LunCreate(BaseModel):
    name: str = Field(description="letters, digits, '.', '_' or '-'; at most 64 characters")
    size: str | int | None = Field(
        default=None, description="bytes, or with a binary unit: 10G, 512M; optional with path"
    )
    number: int | None = Field(default=None, description="LUN number; lowest free if omitted")
    read_only: bool = False
    path: str | None = Field(
        default=None, description="absolute path of an existing or new backing file"
    )


class LunGrow(BaseModel):
    size: str | int = Field(description="the new, larger size: bytes or 10G, 512M, ...")


class LunUpdate(BaseModel):
    read_only: bool | None = None


class LunRepoint(BaseModel):
    path: str = Field(
        description="absolute path of an existing regular file of the LUN's size, outside "
        "any lunseal data directory and used by no other LUN"
    )


class LunStatsModel(BaseModel):
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    trims: int
    zeroes: int
    flushes: int


class LunInfo(BaseModel):
    uuid: str
    name: str
    number: int
    size: int
    read_only: bool = Field(description="hosts cannot write: the flag, or a guard (a mirror)")
    read_only_reason: str = Field(default="", description="why hosts cannot write (or empty)")
    backend: str
    path: str
    created_at: float
    connections: int = Field(description="NBD connections attached to this LUN")
    clients: list[str] = Field(default=[], description="peers of those connections")
    nbd_uris: list[str]
    stats: LunStatsModel
    available: bool = Field(
        default=True, description="false: the backing file cannot be used; see unavailable_reason"
    )
    unavailable_reason: str | None = Field(
        default=None, description="why the LUN cannot serve (missing, refused or locked file)"
    )


class NbdEndpoints(BaseModel):
    tcp: str | None = Field(description="host:port of the NBD TCP listener")
    unix: str | None = Field(description="path of the NBD Unix socket")


class ArrayStatus(BaseModel):
    array_id: str
    version: str
    pid: int
    data_dir: str
    uptime_seconds: float
    last_shutdown_clean: bool
    luns: int
    connections: int
    nbd: NbdEndpoints
    api_url: str
    #: Listeners reachable beyond loopback without protection, one sentence each.
    warnings: list[str] = []
