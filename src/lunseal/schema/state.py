"""API bodies for LUN state tracking: holds, tokens, checks and change maps."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from lunseal.engine.state.tracker import TrackingMode


class HoldAcquire(BaseModel):
    hold: str = Field(default="default", description="name of the consumer holding tracking on")
    mode: TrackingMode | None = Field(
        default=None, description="tracking mode when this hold turns tracking on (counter)"
    )
    track_changes: bool = Field(default=False, description="keep a change map for this hold")
    granularity: str | int | None = Field(
        default=None, description="change-map region size, power of two, 4K-1G (64K)"
    )


class HoldInfo(BaseModel):
    name: str
    created_at: float
    token: str = Field(description="the LUN's token when the hold was acquired")
    granularity: int | None = Field(description="change-map region size, or null: no map")
    changed_bytes: int | None = Field(description="bytes in changed regions since the token")


class StateInfo(BaseModel):
    lun: str
    lun_uuid: str
    tracking: bool
    mode: TrackingMode
    epoch: str = Field(description="random per busy period and recovery; opaque")
    clean: bool = Field(description="the exact state is recorded (no change since)")
    holds: list[str]
    token: str | None = Field(description="current token; null while tracking is off")
    epoch_reason: str = Field(description="why the epoch last changed (empty: never)")


class TokenCheck(BaseModel):
    token: str


class CheckOutcome(BaseModel):
    lun: str
    result: Literal["intact", "changed"]
    reason: str
    token: str
    current: str | None


class ChangedExtentModel(BaseModel):
    offset: int
    length: int


class ChangesInfo(BaseModel):
    lun: str
    hold: str
    since_token: str
    granularity: int
    changed_bytes: int
    extents: list[ChangedExtentModel]
