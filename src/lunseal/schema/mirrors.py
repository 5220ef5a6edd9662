"""API bodies for mirrors."""

from __future__ import annotations

from pydantic import BaseModel, Field

from lunseal.engine.mirror.mirror import MirrorState, TargetAccess


class MirrorCreate(BaseModel):
    source: str = Field(description="source LUN name")
    target: str = Field(description="target LUN name (same size as the source)")
    name: str | None = Field(default=None, description="mirror name (default: the target's)")
    create_target: bool = Field(default=False, description="create the target LUN if missing")
    force: bool = Field(
        default=False, description="overwrite a target that holds data (409 otherwise)"
    )


class MirrorRestore(BaseModel):
    force: bool = Field(
        default=False, description="restore even while hosts are connected to the source (409)"
    )


class MirrorExtent(BaseModel):
    offset: int
    length: int


class MirrorRegions(BaseModel):
    """What the next resync or restore copies: the regions written on either side."""

    granularity: int
    extents: list[MirrorExtent]


class MirrorSplit(BaseModel):
    target_access: TargetAccess = Field(
        default=TargetAccess.RO, description="whether hosts may write the split target"
    )


class MirrorInfo(BaseModel):
    id: str
    name: str
    source: str
    target: str
    state: MirrorState
    percent_done: float = Field(description="progress of the running copy (100 when idle)")
    bytes_left: int = Field(description="bytes in regions that still differ or may differ")
    bytes_copied: int = Field(
        description="bytes copied by the running (or last) copy since the daemon started"
    )
    source_dirty_regions: int
    target_dirty_regions: int
    granularity: int
    split_at: float | None
    target_access: TargetAccess
    reason: str = Field(
        description="why the mirror is degraded or its last restore failed (empty otherwise)"
    )
