"""API routes for state tracking: holds, tokens, checks, change maps.

A tracker is mutated only on its LUN's worker (writes mark it there), so every
route runs its tracker calls there too (:func:`on_worker`), in order with the
LUN's I/O; the event loop only awaits the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import FastAPI, Response

from lunseal.engine.access import Role
from lunseal.engine.array import Array
from lunseal.engine.lun import run_on_lun
from lunseal.engine.state.changemap import DEFAULT_GRANULARITY
from lunseal.engine.state.tracker import Hold, StateTracker
from lunseal.errors import InvalidArgument
from lunseal.frontends.api.auth import allow
from lunseal.schema.state import (
    ChangedExtentModel,
    ChangesInfo,
    CheckOutcome,
    HoldAcquire,
    HoldInfo,
    StateInfo,
    TokenCheck,
)
from lunseal.units import parse_size

T = TypeVar("T")


async def on_worker(tracker: StateTracker, fn: Callable[[], T]) -> T:
    return await run_on_lun(tracker.lun, fn)


def hold_info(hold: Hold) -> HoldInfo:
    changes = hold.changes
    return HoldInfo(
        name=hold.name,
        created_at=hold.created_at,
        token=hold.token,
        granularity=None if changes is None else changes.granularity,
        changed_bytes=None if changes is None else changes.changed_bytes(),
    )


def state_info(tracker: StateTracker) -> StateInfo:
    token = tracker.token() if tracker.tracking else None  # may move to a new epoch first
    s = tracker.state
    return StateInfo(
        lun=tracker.lun.name,
        lun_uuid=tracker.lun.record.uuid,
        tracking=tracker.tracking,
        mode=s.mode,
        epoch=s.epoch,
        clean=s.clean,
        holds=list(tracker.holds),
        token=token,
        epoch_reason=s.epoch_reason,
    )


def install_state_routes(app: FastAPI, array: Array) -> None:
    @app.get(
        "/v1/luns/{name}/state",
        dependencies=[allow(Role.MONITOR)],
        response_model=StateInfo,
        tags=["state"],
    )
    async def get_state(name: str) -> StateInfo:
        """The LUN's tracking status and, while tracking is on, its current token."""
        tracker = array.tracker(name)
        return await on_worker(tracker, lambda: state_info(tracker))

    @app.get(
        "/v1/luns/{name}/state/token",
        dependencies=[allow(Role.MONITOR)],
        response_model=StateInfo,
        tags=["state"],
    )
    async def get_token(name: str) -> StateInfo:
        """GET_LUN_STATE: the current token; 409 while tracking is off."""
        tracker = array.tracker(name)

        def run() -> StateInfo:
            tracker.token()  # raises Conflict when tracking is off
            return state_info(tracker)

        return await on_worker(tracker, run)

    @app.post(
        "/v1/luns/{name}/state/check",
        dependencies=[allow(Role.MONITOR)],
        response_model=CheckOutcome,
        tags=["state"],
    )
    async def check_token(name: str, body: TokenCheck) -> CheckOutcome:
        """Compare a token with the LUN's state: intact or changed, and why.

        A string that is not a token at all is a 400; a token of another LUN or
        epoch is "changed"."""
        tracker = array.tracker(name)
        result = await on_worker(tracker, lambda: tracker.check(body.token))
        return CheckOutcome(
            lun=name,
            result="intact" if result.intact else "changed",
            reason=result.reason,
            token=body.token,
            current=result.current,
        )

    @app.get(
        "/v1/luns/{name}/holds",
        dependencies=[allow(Role.MONITOR)],
        response_model=list[HoldInfo],
        tags=["state"],
    )
    async def list_holds(name: str) -> list[HoldInfo]:
        tracker = array.tracker(name)
        return await on_worker(tracker, lambda: [hold_info(h) for h in tracker.holds.values()])

    @app.post(
        "/v1/luns/{name}/holds",
        dependencies=[allow(Role.OPERATOR)],
        response_model=HoldInfo,
        status_code=201,
        tags=["state"],
    )
    async def acquire_hold(name: str, body: HoldAcquire) -> HoldInfo:
        """ENABLE_LUN_STATE_SNAPSHOT: the first hold turns tracking on."""
        granularity = None
        if body.track_changes or body.granularity is not None:
            granularity = (
                DEFAULT_GRANULARITY if body.granularity is None else parse_size(body.granularity)
            )
        tracker = array.tracker(name)

        def run() -> HoldInfo:
            hold, _token = tracker.acquire(body.hold, mode=body.mode, granularity=granularity)
            return hold_info(hold)

        return await on_worker(tracker, run)

    @app.delete(
        "/v1/luns/{name}/holds/{hold}",
        dependencies=[allow(Role.OPERATOR)],
        status_code=204,
        tags=["state"],
    )
    async def release_hold(name: str, hold: str) -> Response:
        """DISABLE_LUN_STATE_SNAPSHOT: releasing the last hold turns tracking off."""
        tracker = array.tracker(name)
        await on_worker(tracker, lambda: tracker.release(hold))
        return Response(status_code=204)

    @app.get(
        "/v1/luns/{name}/holds/{hold}/changes",
        dependencies=[allow(Role.MONITOR)],
        response_model=ChangesInfo,
        tags=["state"],
    )
    async def changes(name: str, hold: str) -> ChangesInfo:
        """Regions changed since the hold's token (the hold must track changes)."""
        tracker = array.tracker(name)
        h = await on_worker(tracker, lambda: tracker.hold(hold))
        if h.changes is None:
            raise InvalidArgument(
                f"hold {hold!r} keeps no change map (acquire it with track_changes)"
            )
        changes = h.changes
        extents = await on_worker(tracker, changes.extents)  # the map changes on the worker
        return ChangesInfo(
            lun=name,
            hold=hold,
            since_token=h.token,
            granularity=changes.granularity,
            changed_bytes=sum(e.length for e in extents),
            extents=[ChangedExtentModel(offset=e.offset, length=e.length) for e in extents],
        )
