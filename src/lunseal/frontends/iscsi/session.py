"""One iSCSI connection and its session (MaxConnections=1), sans-I/O.

:meth:`Connection.receive` takes decoded PDUs.  What the connection wants
done comes out in three places the caller drains after each call:

* :attr:`Connection.out` - encoded PDUs to send, in order;
* :attr:`Connection.work` - SCSI commands and task-management actions to run
  on the LUN's worker; the caller reports back with :meth:`command_done` and
  :meth:`tmf_done`;
* :attr:`Connection.closing` - set once the connection is to be closed after
  what is in ``out`` has been sent (logout, protocol error, keep-alive lost).

Commands are numbered by CmdSN (RFC 7143 4.2.2): a non-immediate command is
taken only when its CmdSN is the expected one; anything outside the window is
dropped without an answer, as the RFC asks.  The window advertised in
MaxCmdSN shrinks with the tasks the connection holds, so an initiator never
has more than :data:`QUEUE_DEPTH` commands outstanding.

Write data arrives as immediate data, unsolicited Data-Out (up to
FirstBurstLength) and solicited Data-Out (R2T, one outstanding per task,
MaxBurstLength each); every Data-Out is checked (TTT, DataSN, buffer offset,
F bit).  One out of sequence is rejected and ends its task, which the
initiator then fails (ErrorRecoveryLevel 0 recovers nothing within a
command); the connection and its other tasks go on.  A PDU that cannot be
framed ends the connection (the server's business).  Memory is
bounded: a task's buffer is at most :data:`MAX_TRANSFER` bytes, and tasks
beyond :data:`DATA_OUT_BUDGET` bytes of buffers wait for their R2T.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from lunseal.engine.backends.base import FileSlice
from lunseal.engine.lun import Lun
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import AccessPolicy
from lunseal.frontends.iscsi.login import DISCOVERY, PORTAL_GROUP_TAG, Login
from lunseal.frontends.scsi.interface import (
    CHECK_CONDITION,
    GOOD,
    Nexus,
    ScsiCommand,
    ScsiResult,
)

log = logging.getLogger(__name__)
#: Every PDU header received, at debug level (off by default: it is per PDU).
_TRACE = logging.getLogger("lunseal.frontends.iscsi.trace")

#: Commands an initiator may have outstanding (the CmdSN window).
QUEUE_DEPTH = 128
#: The largest data-out one command may carry (BLOCK LIMITS must not promise more).
MAX_TRANSFER = 32 << 20
#: Data-out buffer bytes a connection holds at most (one larger command always runs).
DATA_OUT_BUDGET = 64 << 20
#: Text a request may spread over continued PDUs before it is refused.
MAX_TEXT = 64 << 10
#: ITTs of aborted tasks remembered so their late Data-Out is ignored, not an error.
ABORTED_MEMORY = 256
SERIAL = 1 << 32

# Task management functions and responses (RFC 7143 11.5, 11.6).
TMF_ABORT_TASK = 1
TMF_ABORT_TASK_SET = 2
TMF_CLEAR_ACA = 3
TMF_CLEAR_TASK_SET = 4
TMF_LUN_RESET = 5
TMF_TARGET_WARM_RESET = 6
TMF_TARGET_COLD_RESET = 7
TMF_TASK_REASSIGN = 8
TMF_COMPLETE = 0
TMF_NO_TASK = 1
TMF_NO_LUN = 2
TMF_REASSIGN_UNSUPPORTED = 4
TMF_UNSUPPORTED = 5

# Sense data the transport itself produces (fixed format, SPC-4 4.5.3).
ILLEGAL_REQUEST = 0x05
HARDWARE_ERROR = 0x04


def fixed_sense(key: int, asc: int, ascq: int) -> bytes:
    return bytes([0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0])


SENSE_TOO_LONG = fixed_sense(ILLEGAL_REQUEST, 0x24, 0x00)


class ScsiTargetLike(Protocol):
    """What the transport needs of ``frontends.scsi.target.ScsiTarget``."""

    def lun(self, nexus: Nexus, number: int) -> Lun | None: ...
    def data_out_length(self, nexus: Nexus, number: int, cdb: bytes) -> int: ...
    def execute(self, cmd: ScsiCommand) -> ScsiResult: ...
    def reset_lun(self, nexus: Nexus, number: int) -> None: ...
    def reset_target(self, nexus: Nexus) -> None: ...
    def nexus_gone(self, nexus: Nexus) -> None: ...


def sn_lt(a: int, b: int) -> bool:
    """Serial number arithmetic (RFC 1982) for 32-bit sequence numbers."""
    return a != b and ((b - a) % SERIAL) < (1 << 31)


def sn_le(a: int, b: int) -> bool:
    return a == b or sn_lt(a, b)


@dataclass(eq=False, slots=True)
class Task:
    itt: int
    lun: int
    lun_field: bytes
    cdb: bytes
    edtl: int
    read: bool
    write: bool
    cmdsn: int
    #: Data-out bytes the command is executed with: what the CDB asks for,
    #: truncated to the EDTL (RFC 7143 11.4.5.1).
    want: int = 0
    #: Data-out bytes the CDB asks for (the residual is counted against it).
    cdb_want: int = 0
    #: More data-out than :data:`MAX_TRANSFER`: answered without running it.
    too_long: bool = False
    buf: bytearray | None = None
    #: All the data came as immediate data: used as it is, no buffer (the common small write).
    whole: bytes | None = None
    #: Data that arrived before the buffer was granted (immediate and unsolicited).
    early: list[tuple[int, bytes]] = field(default_factory=list)
    received: int = 0
    unsolicited_end: int = 0  # offset at which unsolicited data stops
    in_unsolicited: bool = False
    r2t_ttt: int | None = None
    r2t_end: int = 0
    datasn: int = 0  # next Data-Out DataSN expected in the current sequence
    r2tsn: int = 0
    dispatched: bool = False
    aborted: bool = False
    #: Data-in bytes the command produced when fewer were handed over (a file
    #: slice read only as far as EDTL); ``None``: all of ``ScsiResult.data``.
    produced: int | None = None


@dataclass
class CommandWork:
    task: Task
    command: ScsiCommand


@dataclass
class TmfWork:
    itt: int
    function: int
    lun: int
    #: Runs on the LUN's worker (after every command queued there before it).
    action: Callable[[], None]
    response: int = TMF_COMPLETE


Work = CommandWork | TmfWork


class Connection:
    def __init__(
        self,
        target: ScsiTargetLike,
        *,
        target_name: str,
        policy: AccessPolicy,
        portal: str,
        new_tsih: Callable[[], int],
    ) -> None:
        self.target = target
        self.target_name = target_name
        self.portal = portal
        self._new_tsih = new_tsih
        self.login = Login(target_name=target_name, policy=policy, portal=portal)
        self.params = self.login.params
        self.decoder = p.PduDecoder()
        self.digests = p.NO_DIGESTS
        self.full_feature = False
        self.nexus: Nexus | None = None
        self.tsih = 0
        self.out: p.Wire = []
        self.work: list[Work] = []
        self.closing = False
        #: Why the connection is closing (for the log).
        self.reason = ""
        #: Who is at the other end, for log lines (the server sets it).
        self.peer = "?"
        self.statsn = secrets.randbelow(1 << 31)
        self.exp_cmdsn = 0
        self.tasks: dict[int, Task] = {}
        self._aborted: deque[int] = deque(maxlen=ABORTED_MEMORY)
        self._waiting: deque[Task] = deque()  # tasks waiting for a data-out buffer
        self._buffered = 0
        self._next_ttt = 1
        self._logout: tuple[int, int] | None = None  # (ITT, response) once logging out
        self._ping_ttt: int | None = None
        self._text: bytearray = bytearray()

    # -- sequence numbers ---------------------------------------------------------

    @property
    def max_cmdsn(self) -> int:
        room = max(0, QUEUE_DEPTH - len(self.tasks))
        return (self.exp_cmdsn + room - 1) % SERIAL

    def _status_sns(self) -> dict[str, int]:
        sns = {"statsn": self.statsn, "exp_cmdsn": self.exp_cmdsn, "max_cmdsn": self.max_cmdsn}
        self.statsn = (self.statsn + 1) % SERIAL
        return sns

    def _accept_cmdsn(self, pdu: p.Pdu) -> bool:
        """Whether to act on a numbered PDU; advances ExpCmdSN for a queued one."""
        cmdsn = pdu.cmdsn
        if pdu.immediate:
            return True
        if cmdsn != self.exp_cmdsn:
            # Outside the window, or a gap we cannot fill (one connection, ERL 0):
            # RFC 7143 4.2.2.1 has such commands ignored.
            log.debug("ignoring CmdSN %d (expected %d)", cmdsn, self.exp_cmdsn)
            return False
        self.exp_cmdsn = (self.exp_cmdsn + 1) % SERIAL
        return True

    # -- input ----------------------------------------------------------------------

    def receive(self, pdu: p.Pdu) -> None:
        if self.closing:
            return
        if _TRACE.isEnabledFor(logging.DEBUG):
            _TRACE.debug("PDU in: %s", pdu.bhs.hex())
        self._ping_ttt = None  # any PDU shows the initiator is alive
        if not self.full_feature:
            self._login_pdu(pdu)
            return
        op = pdu.opcode
        if self._logout is not None and op != p.DATA_OUT:
            return  # nothing new after a logout request
        if op == p.SCSI_COMMAND:
            self._scsi_command(pdu)
        elif op == p.DATA_OUT:
            self._data_out(pdu)
        elif op == p.NOP_OUT:
            self._nop_out(pdu)
        elif op == p.TASK_MGMT:
            self._task_mgmt(pdu)
        elif op == p.TEXT:
            self._text_request(pdu)
        elif op == p.LOGOUT:
            self._logout_request(pdu)
        elif op == p.LOGIN:
            self.fail("login PDU in full feature phase", p.REJECT_PROTOCOL_ERROR, pdu.bhs)
        else:  # SNACK: no recovery at ErrorRecoveryLevel 0
            self._reject(p.REJECT_SNACK if op == p.SNACK else p.REJECT_NOT_SUPPORTED, pdu.bhs)

    def fail(self, why: str, reason: int | None = None, header: bytes = b"") -> None:
        """Close the connection for a protocol error, with a Reject first if given."""
        if self.closing:
            return
        if reason is not None and header:
            self._reject(reason, header)
        self.reason = why
        self.closing = True

    def _reject(self, reason: int, header: bytes) -> None:
        self.out.append(
            p.reject(reason=reason, header=header, **self._status_sns(), digests=self.digests)
        )

    # -- login ------------------------------------------------------------------------

    def _login_pdu(self, pdu: p.Pdu) -> None:
        if pdu.opcode != p.LOGIN:
            self.fail(f"opcode 0x{pdu.opcode:02x} before login completed")
            return
        if self.login.stage < 0:
            self.exp_cmdsn = pdu.cmdsn
        reply = self.login.receive(pdu)
        if reply.done:
            self.tsih = self._new_tsih()
        out = p.login_response(
            flags=reply.flags,
            isid=pdu.bhs[8:14],
            tsih=self.tsih,
            itt=pdu.itt,
            status_class=reply.status >> 8,
            status_detail=reply.status & 0xFF,
            data=reply.data,
            **self._status_sns(),
        )
        self.out.append(out)
        if reply.failed:
            self.fail(f"login refused: {reply.why}")
        elif reply.done:
            self._enter_full_feature()

    def _enter_full_feature(self) -> None:
        login = self.login
        self.full_feature = True
        self.digests = p.Digests(self.params.header_digest, self.params.data_digest)
        self.decoder.header_digest = self.params.header_digest
        self.decoder.data_digest = self.params.data_digest
        self.decoder.max_data = self.params.target_max_recv_data
        assert login.access is not None
        self.nexus = Nexus(
            initiator_name=login.initiator_name,
            initiator_port=f"{login.initiator_name},i,0x{login.isid.hex()}",
            target_port=f"{self.target_name},t,0x{PORTAL_GROUP_TAG:04x}",
            access=login.access.luns,
            address=self.peer,
        )

    @property
    def discovery(self) -> bool:
        return self.login.session_type == DISCOVERY

    @property
    def session_key(self) -> tuple[str, bytes]:
        """Initiator name and ISID: a second login with the same key reinstates the session."""
        return (self.login.initiator_name, self.login.isid)

    # -- SCSI commands --------------------------------------------------------------

    def _scsi_command(self, pdu: p.Pdu) -> None:
        if self.discovery:
            self._reject(p.REJECT_NOT_SUPPORTED, pdu.bhs)
            return
        if pdu.itt in self.tasks:
            self.fail(f"ITT 0x{pdu.itt:08x} reused", p.REJECT_TASK_IN_PROGRESS, pdu.bhs)
            return
        if pdu.ahs:
            self._reject(p.REJECT_NOT_SUPPORTED, pdu.bhs)  # no CDBs beyond 16 bytes
            return
        if not self._accept_cmdsn(pdu):
            return
        number = p.lun_number(pdu.lun_field)
        flags = pdu.flags
        task = Task(  # positional: this runs once per command on the event loop
            pdu.itt,
            -1 if number is None else number,
            pdu.lun_field,
            pdu.bhs[32:48],
            pdu.u32(20),
            bool(flags & p.F_READ),
            bool(flags & p.F_WRITE),
            pdu.cmdsn,
        )
        if pdu.data and (not task.write or not self.params.immediate_data):
            self.fail(
                "immediate data without the W bit or ImmediateData",
                p.REJECT_PROTOCOL_ERROR,
                pdu.bhs,
            )
            return
        if len(pdu.data) > min(task.edtl, self.params.first_burst):
            self.fail(
                "immediate data beyond FirstBurstLength or EDTL", p.REJECT_PROTOCOL_ERROR, pdu.bhs
            )
            return
        self.tasks[task.itt] = task
        assert self.nexus is not None
        if task.lun >= 0:
            # Asked even without the W bit: a data-out command sent without it
            # has all its data as overflow residual.
            task.cdb_want = self.target.data_out_length(self.nexus, task.lun, task.cdb)
        if not task.write:
            self._dispatch(task)
            return
        self._start_write(task, pdu)

    def _start_write(self, task: Task, pdu: p.Pdu) -> None:
        task.want = min(task.cdb_want, task.edtl)
        if task.want > MAX_TRANSFER:
            task.too_long, task.want = True, 0
        unsolicited = 0 if self.params.initial_r2t else self.params.first_burst
        task.unsolicited_end = min(task.edtl, max(unsolicited, len(pdu.data)))
        task.in_unsolicited = not pdu.final and not self.params.initial_r2t
        if pdu.final and len(pdu.data) >= task.want:
            task.whole = pdu.data
            task.received = len(pdu.data)
            self._dispatch(task)
            return
        if task.want and not self._grant(task):
            self._waiting.append(task)
        if pdu.data:
            self._store(task, 0, pdu.data)
        task.received = len(pdu.data)
        if not task.in_unsolicited:
            self._next_step(task)

    def _grant(self, task: Task) -> bool:
        """Give the task its data-out buffer if the connection's budget allows."""
        if self._buffered and self._buffered + task.want > DATA_OUT_BUDGET:
            return False
        task.buf = bytearray(task.want)
        self._buffered += task.want
        for offset, data in task.early:
            self._store(task, offset, data)
        task.early.clear()
        return True

    def _store(self, task: Task, offset: int, data: bytes) -> None:
        if offset >= task.want:
            return  # beyond what the command uses (EDTL above the CDB's length): dropped
        data = data[: task.want - offset]
        if task.buf is None:
            task.early.append((offset, data))
        else:
            task.buf[offset : offset + len(data)] = data

    def _next_step(self, task: Task) -> None:
        """After a data sequence ended: execute, or ask for the next burst."""
        if task.buf is None and task.want:
            return  # waiting for a buffer; _release grants it and comes back here
        if task.received >= task.want:
            self._dispatch(task)
            return
        length = min(self.params.max_burst, task.want - task.received)
        task.r2t_ttt = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        task.r2t_end = task.received + length
        task.datasn = 0
        self.out.append(
            p.r2t(
                itt=task.itt,
                ttt=task.r2t_ttt,
                statsn=self.statsn,
                exp_cmdsn=self.exp_cmdsn,
                max_cmdsn=self.max_cmdsn,
                r2tsn=task.r2tsn,
                offset=task.received,
                length=length,
                lun=task.lun_field,
                digests=self.digests,
            )
        )
        task.r2tsn += 1

    def _data_out(self, pdu: p.Pdu) -> None:
        task = self.tasks.get(pdu.itt)
        if task is None or task.dispatched:
            if pdu.itt not in self._aborted:  # else: the rest of an aborted command's data
                self._bad_data_out(None, f"Data-Out for no task (ITT 0x{pdu.itt:08x})", pdu)
            return
        ttt, offset, datasn = pdu.ttt, pdu.u32(40), pdu.u32(36)
        if task.in_unsolicited:
            ok_ttt, end = ttt == p.RESERVED_TAG, task.unsolicited_end
        else:
            ok_ttt, end = task.r2t_ttt is not None and ttt == task.r2t_ttt, task.r2t_end
        why = ""
        if not ok_ttt:
            why = f"Data-Out with unexpected TTT 0x{ttt:08x}"
        elif datasn != task.datasn:
            why = f"Data-Out DataSN {datasn}, expected {task.datasn}"
        elif offset != task.received or offset + len(pdu.data) > end:
            why = f"Data-Out at offset {offset} out of order or beyond the burst"
        elif not pdu.final and offset + len(pdu.data) >= end:
            why = "Data-Out burst complete without the F bit"
        elif pdu.final and not task.in_unsolicited and offset + len(pdu.data) != end:
            why = "Data-Out sequence ended short of the R2T"
        if why:
            self._bad_data_out(task, why, pdu)
            return
        self._store(task, offset, pdu.data)
        task.received += len(pdu.data)
        task.datasn += 1
        if pdu.final:
            task.in_unsolicited = False
            task.r2t_ttt = None
            task.datasn = 0
            self._next_step(task)

    def _bad_data_out(self, task: Task | None, why: str, pdu: p.Pdu) -> None:
        """A Data-Out out of sequence: Reject it and end its task, which the
        initiator then fails (ERL 0 recovers nothing within a command).  The
        connection and the other tasks carry on."""
        log.warning("iSCSI initiator %s: %s; rejecting it and aborting the command", self.peer, why)
        self._reject(p.REJECT_PROTOCOL_ERROR, pdu.bhs)
        if task is not None:
            self._abort(task)

    def _dispatch(self, task: Task) -> None:
        assert self.nexus is not None
        task.dispatched = True
        if task.too_long:
            self._complete(task, ScsiResult(status=CHECK_CONDITION, sense=SENSE_TOO_LONG))
            return
        if task.whole is not None:
            data: bytes | memoryview = memoryview(task.whole)[: task.want]
        else:
            data = memoryview(task.buf) if task.buf is not None else b""
        cmd = ScsiCommand(
            lun=task.lun,
            cdb=task.cdb,
            nexus=self.nexus,
            data_out=data,
            expected_length=task.edtl,
        )
        self.work.append(CommandWork(task, cmd))

    def command_done(self, task: Task, result: ScsiResult) -> None:
        """The command ran: send its data and status (unless it was aborted)."""
        self._release(task)
        if not task.aborted and self.tasks.get(task.itt) is task:
            self._complete(task, result)
        self._maybe_finish_logout()

    def _release(self, task: Task) -> None:
        if task.buf is not None:
            self._buffered -= len(task.buf)
            task.buf = None
        while self._waiting:
            waiting = self._waiting[0]
            if waiting.aborted or self.tasks.get(waiting.itt) is not waiting:
                self._waiting.popleft()
                continue
            if not self._grant(waiting):
                break
            self._waiting.popleft()
            if not waiting.in_unsolicited:
                self._next_step(waiting)

    def _complete(self, task: Task, result: ScsiResult) -> None:
        del self.tasks[task.itt]
        data = result.data
        if isinstance(data, FileSlice):
            raise TypeError("file slices are read before they reach the session")
        view = memoryview(data)
        total = view.nbytes if task.produced is None else task.produced
        if (task.write or task.cdb_want) and not task.read:
            total = task.cdb_want
            send = 0
        else:
            send = min(total, task.edtl)
        flags, residual = _residual(total, task.edtl)
        datasn = self._send_data_in(task, view[:send], result, flags, residual)
        if datasn < 0:
            return  # status went in the last Data-In
        if result.status == CHECK_CONDITION and result.sense:
            self.out.append(
                p.scsi_response(
                    itt=task.itt,
                    status=result.status,
                    residual_flags=flags,
                    residual=residual,
                    sense=result.sense,
                    exp_datasn=datasn + task.r2tsn,
                    digests=self.digests,
                    **self._status_sns(),
                )
            )
            return
        statsn = self.statsn
        self.statsn = (statsn + 1) % SERIAL
        self.out.append(
            p.scsi_status(
                task.itt,
                result.status,
                statsn,
                self.exp_cmdsn,
                self.max_cmdsn,
                flags,
                residual,
                datasn + task.r2tsn,
                self.digests,
            )
        )

    def _send_data_in(
        self, task: Task, data: memoryview, result: ScsiResult, flags: int, residual: int
    ) -> int:
        """Send ``data`` as Data-In PDUs; returns how many, or -1 if the last
        one carried the status (phase collapse, RFC 7143 11.7.4)."""
        n = len(data)
        if not n:
            return 0
        collapse = result.status == GOOD and not result.sense
        seg = self.params.initiator_max_recv_data
        burst = self.params.max_burst
        datasn = 0
        offset = 0
        while offset < n:
            end = min(n, offset + seg, (offset // burst + 1) * burst)
            last = end == n
            status = result.status if last and collapse else None
            sns = self._status_sns() if status is not None else {"statsn": 0}
            self.out.extend(
                p.data_in(
                    itt=task.itt,
                    datasn=datasn,
                    offset=offset,
                    data=data[offset:end],
                    exp_cmdsn=self.exp_cmdsn,
                    max_cmdsn=self.max_cmdsn,
                    final=last or end % burst == 0,
                    status=status,
                    statsn=sns["statsn"],
                    residual_flags=flags,
                    residual=residual,
                    lun=task.lun_field,
                    digests=self.digests,
                )
            )
            datasn += 1
            offset = end
        return -1 if collapse else datasn

    # -- NOP, text, task management, logout -------------------------------------------

    def _nop_out(self, pdu: p.Pdu) -> None:
        if pdu.itt == p.RESERVED_TAG:
            if not pdu.immediate:
                self._accept_cmdsn(pdu)
            return  # an answer to our ping, or a ping that wants no answer
        if not self._accept_cmdsn(pdu):
            return
        self.out.append(
            p.nop_in(
                itt=pdu.itt,
                ttt=p.RESERVED_TAG,
                lun=pdu.lun_field,
                data=pdu.data[: self.params.initiator_max_recv_data],
                digests=self.digests,
                **self._status_sns(),
            )
        )

    def ping(self) -> bool:
        """A keep-alive: send a NOP-In ping.  False if the last one went
        unanswered (the caller closes the connection)."""
        if self._ping_ttt is not None:
            return False
        if not self.full_feature:
            return True
        self._ping_ttt = self._next_ttt
        self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        self.out.append(
            p.nop_in(
                itt=p.RESERVED_TAG,
                ttt=self._ping_ttt,
                statsn=self.statsn,  # not advanced: the ping is no status
                exp_cmdsn=self.exp_cmdsn,
                max_cmdsn=self.max_cmdsn,
                digests=self.digests,
            )
        )
        return True

    def _text_request(self, pdu: p.Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        self._text += pdu.data
        if len(self._text) > MAX_TEXT:
            self.fail("text request too long", p.REJECT_PROTOCOL_ERROR, pdu.bhs)
            return
        if not pdu.final:
            # The initiator sends more: acknowledge this part with an empty answer.
            self._text_response(pdu, b"", final=False)
            return
        try:
            offers = text.parse(bytes(self._text))
        except text.TextError as exc:
            self.fail(exc.message, p.REJECT_PROTOCOL_ERROR, pdu.bhs)
            return
        finally:
            self._text.clear()
        self._text_response(pdu, text.encode(self._text_answers(offers)), final=True)

    def _text_answers(self, offers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        for key, value in offers:
            if key == "SendTargets":
                ours = value in ("", self.target_name) and not self.discovery
                if value == "All" or ours:
                    answers += [
                        ("TargetName", self.target_name),
                        ("TargetAddress", f"{self.portal},{PORTAL_GROUP_TAG}"),
                    ]
            elif key == "MaxRecvDataSegmentLength":
                n = text.parse_number(value, text.MIN_DATA_LENGTH, text.MAX_DATA_LENGTH)
                if n is None:
                    answers.append((key, text.REJECT))
                else:
                    self.params.initiator_max_recv_data = n
                    answers.append((key, str(self.params.target_max_recv_data)))
            elif key in text.LOGIN_ONLY:
                answers.append((key, text.REJECT))
            else:
                answers.append((key, text.NOT_UNDERSTOOD))
        return answers

    def _text_response(self, pdu: p.Pdu, data: bytes, *, final: bool) -> None:
        ttt = p.RESERVED_TAG
        if not final:
            ttt = self._next_ttt
            self._next_ttt = self._next_ttt % 0xFFFFFFFE + 1
        self.out.append(
            p.text_response(
                flags=p.F_FINAL if final else 0,
                itt=pdu.itt,
                ttt=ttt,
                data=data[: self.params.initiator_max_recv_data],
                lun=pdu.lun_field,
                digests=self.digests,
                **self._status_sns(),
            )
        )

    def _task_mgmt(self, pdu: p.Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        assert self.nexus is not None
        nexus = self.nexus
        function = pdu.flags & 0x7F
        number = p.lun_number(pdu.lun_field)
        lun = -1 if number is None else number
        exists = number is not None and self.target.lun(nexus, number) is not None

        def noop() -> None:
            return None

        if function == TMF_ABORT_TASK:
            task = self.tasks.get(pdu.u32(20))
            if task is None or (pdu.u32(32) != task.cmdsn):
                self._tmf_response(pdu.itt, TMF_NO_TASK)
                return
            self._abort(task)
            self.work.append(TmfWork(pdu.itt, function, task.lun, noop))
        elif function in (TMF_ABORT_TASK_SET, TMF_CLEAR_TASK_SET, TMF_LUN_RESET):
            if not exists:
                self._tmf_response(pdu.itt, TMF_NO_LUN)
                return
            for task in [t for t in self.tasks.values() if t.lun == lun]:
                self._abort(task)
            action = noop
            if function == TMF_LUN_RESET:

                def action() -> None:
                    self.target.reset_lun(nexus, lun)

            self.work.append(TmfWork(pdu.itt, function, lun, action))
        elif function == TMF_TARGET_WARM_RESET:
            for task in list(self.tasks.values()):
                self._abort(task)
            self.work.append(
                TmfWork(pdu.itt, function, -1, lambda: self.target.reset_target(nexus))
            )
        elif function == TMF_TASK_REASSIGN:
            self._tmf_response(pdu.itt, TMF_REASSIGN_UNSUPPORTED)
        else:
            self._tmf_response(pdu.itt, TMF_UNSUPPORTED)

    def _abort(self, task: Task) -> None:
        task.aborted = True
        self.tasks.pop(task.itt, None)
        self._aborted.append(task.itt)
        if not task.dispatched:
            self._release(task)

    def tmf_done(self, work: TmfWork) -> None:
        self._tmf_response(work.itt, work.response)

    def _tmf_response(self, itt: int, response: int) -> None:
        self.out.append(
            p.task_mgmt_response(
                itt=itt, response=response, digests=self.digests, **self._status_sns()
            )
        )
        self._maybe_finish_logout()

    def _logout_request(self, pdu: p.Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        reason = pdu.flags & 0x7F
        response = 0 if reason in (0, 1) else 2  # no connection recovery at ERL 0
        self._logout = (pdu.itt, response)
        for task in [t for t in self.tasks.values() if not t.dispatched]:
            self._abort(task)  # its data will not come any more
        self._maybe_finish_logout()

    def _maybe_finish_logout(self) -> None:
        if self._logout is None or self.tasks or self.closing:
            return
        itt, response = self._logout
        self.out.append(
            p.logout_response(
                itt=itt,
                response=response,
                time2wait=0,
                time2retain=0,
                digests=self.digests,
                **self._status_sns(),
            )
        )
        self.reason = "logout"
        self.closing = True


def _residual(total: int, edtl: int) -> tuple[int, int]:
    """Residual flags and count when the command moves ``total`` bytes (RFC 7143 11.4.5)."""
    if total > edtl:
        return p.F_OVERFLOW, total - edtl
    if total < edtl:
        return p.F_UNDERFLOW, edtl - total
    return 0, 0
