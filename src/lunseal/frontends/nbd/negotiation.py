"""Option haggling: turns OptionRequest events into replies and an outcome.

Pure logic over a codec-free interface: it returns the bytes to send and
whether to stay in negotiation, enter transmission with a LUN, or hang up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lunseal.engine.lun import Lun
from lunseal.frontends.nbd import codec
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.access import Access
from lunseal.tlsconfig import TlsMode

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1

#: Resolves an export name to a LUN (``None``: no such export).
ExportResolver = Callable[[str], Lun | None]
#: What this connection's client may do with a LUN (the export ACL).
AccessCheck = Callable[[Lun], Access]


def _anyone(_lun: Lun) -> Access:
    return Access.READ_WRITE


@dataclass
class Outcome:
    replies: list[bytes]
    #: Set when negotiation is over and transmission starts on this LUN.
    lun: Lun | None = None
    close: bool = False
    #: Set when the replies end with STARTTLS's ACK: the TLS handshake comes next.
    starttls: bool = False
    #: The client may only read ``lun`` (its ACL entry is read-only).
    read_only: bool = False


@dataclass
class Negotiator:
    resolve: ExportResolver
    list_exports: Callable[[], Iterable[Lun]]
    access: AccessCheck = _anyone
    no_zeroes: bool = False
    structured: bool = False
    #: Export name the selected meta contexts belong to, and the contexts.
    meta_export: str | None = None
    meta_contexts: dict[int, str] = field(default_factory=dict)
    #: Whether STARTTLS is offered (and required) on this connection.
    tls_mode: TlsMode = TlsMode.OFF
    #: The connection is encrypted already (this negotiator starts after STARTTLS).
    tls_active: bool = False

    def handle(self, option: int, data: bytes, *, oversize: bool = False) -> Outcome:
        if self._tls_required(option):
            if option == c.OPT_EXPORT_NAME:
                return Outcome([], close=True)  # no error reply exists for it: hang up
            message = "TLS is required: negotiate STARTTLS first"
            return Outcome([codec.option_error(option, c.REP_ERR_TLS_REQD, message)])
        if oversize:
            return self._too_big(option)
        handler = _HANDLERS.get(option)
        if handler is None:
            return Outcome([codec.option_error(option, c.REP_ERR_UNSUP, "unsupported option")])
        try:
            return handler(self, option, data)
        except codec.OptionDataError as exc:
            if option == c.OPT_EXPORT_NAME:
                return Outcome([], close=True)  # no error reply exists for it: hang up
            return Outcome([codec.option_error(option, c.REP_ERR_INVALID, str(exc))])

    def _too_big(self, option: int) -> Outcome:
        if option == c.OPT_EXPORT_NAME:
            return Outcome([], close=True)  # no error reply exists for it: hang up
        if option == c.OPT_SET_META_CONTEXT:
            self.meta_export, self.meta_contexts = None, {}  # SET replaces even when it fails
        message = f"option data over {c.MAX_OPTION_DATA} bytes"
        return Outcome([codec.option_error(option, c.REP_ERR_TOO_BIG, message)])

    def _tls_required(self, option: int) -> bool:
        # Before the upgrade only STARTTLS itself and ABORT (which reveals
        # nothing) are served; every answer about exports waits for TLS.
        return (
            self.tls_mode == TlsMode.REQUIRE
            and not self.tls_active
            and option not in (c.OPT_STARTTLS, c.OPT_ABORT)
        )

    @property
    def base_allocation(self) -> bool:
        return BASE_ALLOCATION_ID in self.meta_contexts

    # -- options --------------------------------------------------------------

    def _export_name(self, option: int, data: bytes) -> Outcome:
        name = codec.parse_export_name(data)
        lun, access = self._resolve(name)
        if lun is None or not lun.available:
            # The protocol has no error reply for EXPORT_NAME: hang up.
            return Outcome([], close=True)
        self._keep_contexts_for(name)
        read_only = access is Access.READ_ONLY
        flags = transmission_flags(lun, structured=self.structured, read_only=read_only)
        reply = codec.export_name_reply(lun.size, flags, no_zeroes=self.no_zeroes)
        return Outcome([reply], lun=lun, read_only=read_only)

    def _abort(self, option: int, data: bytes) -> Outcome:
        return Outcome([codec.option_reply(option, c.REP_ACK)], close=True)

    def _list(self, option: int, data: bytes) -> Outcome:
        if data:
            raise codec.OptionDataError("LIST takes no data")
        # Unavailable LUNs are left out: clients such as ``nbdinfo --list`` open
        # every export listed and give up on the whole list when one refuses.
        replies = [
            codec.option_reply(option, c.REP_SERVER, codec.server_entry(lun.name, describe(lun)))
            for lun in self.list_exports()
            if lun.available and self.access(lun) is not Access.NONE
        ]
        return Outcome([*replies, codec.option_reply(option, c.REP_ACK)])

    def _starttls(self, option: int, data: bytes) -> Outcome:
        if self.tls_mode == TlsMode.OFF:
            return Outcome([codec.option_error(option, c.REP_ERR_UNSUP, "TLS is not configured")])
        if self.tls_active:
            return Outcome([codec.option_error(option, c.REP_ERR_INVALID, "TLS is already on")])
        if data:
            raise codec.OptionDataError("STARTTLS takes no data")
        return Outcome([codec.option_reply(option, c.REP_ACK)], starttls=True)

    def _info_or_go(self, option: int, data: bytes) -> Outcome:
        name, wanted = codec.parse_info_request(data)
        lun, access = self._resolve(name)
        if lun is None or not lun.available:
            return Outcome([_unknown_export(option, name, lun)])
        read_only = access is Access.READ_ONLY
        flags = transmission_flags(lun, structured=self.structured, read_only=read_only)
        infos = [codec.info_export(lun.size, flags)]
        if c.INFO_NAME in wanted:
            infos.append(codec.info_name(lun.name))
        if c.INFO_DESCRIPTION in wanted:
            infos.append(codec.info_description(describe(lun)))
        # Always sent: clients that did not ask still benefit, and min=1 constrains nobody.
        infos.append(codec.info_block_size(c.MIN_BLOCK, c.PREFERRED_BLOCK, c.MAX_PAYLOAD))
        replies = [codec.option_reply(option, c.REP_INFO, info) for info in infos]
        replies.append(codec.option_reply(option, c.REP_ACK))
        if option == c.OPT_INFO:
            return Outcome(replies)
        self._keep_contexts_for(name)
        return Outcome(replies, lun=lun, read_only=read_only)

    def _structured_reply(self, option: int, data: bytes) -> Outcome:
        if data:
            raise codec.OptionDataError("STRUCTURED_REPLY takes no data")
        self.structured = True
        return Outcome([codec.option_reply(option, c.REP_ACK)])

    def _meta_context(self, option: int, data: bytes) -> Outcome:
        if option == c.OPT_SET_META_CONTEXT:
            # SET replaces the selection even when it fails.
            self.meta_export, self.meta_contexts = None, {}
        if option == c.OPT_SET_META_CONTEXT and not self.structured:
            # LIST is allowed before structured replies (as nbdkit and qemu-nbd do);
            # SET is not: the contexts could never be used.
            return Outcome(
                [
                    codec.option_error(
                        option, c.REP_ERR_INVALID, "negotiate structured replies first"
                    )
                ]
            )
        name, queries = codec.parse_meta_context_request(data)
        lun, _access = self._resolve(name)
        if lun is None or not lun.available:
            return Outcome([_unknown_export(option, name, lun)])
        if option == c.OPT_LIST_META_CONTEXT:
            # No queries lists everything; "base:" is the namespace wildcard.
            chosen = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            chosen = BASE_ALLOCATION in queries
            self.meta_export = name
            self.meta_contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION} if chosen else {}
        replies = []
        if chosen:
            # LIST replies carry a reserved id that SHOULD be 0.
            context_id = BASE_ALLOCATION_ID if option == c.OPT_SET_META_CONTEXT else 0
            entry = codec.meta_context_entry(context_id, BASE_ALLOCATION)
            replies.append(codec.option_reply(option, c.REP_META_CONTEXT, entry))
        replies.append(codec.option_reply(option, c.REP_ACK))
        return Outcome(replies)

    def _resolve(self, name: str) -> tuple[Lun | None, Access]:
        """The LUN a name opens for this client: one it may not open is
        answered exactly as a missing one, so its name and size do not leak."""
        lun = self.resolve(name)
        if lun is None:
            return None, Access.NONE
        access = self.access(lun)
        return (None, access) if access is Access.NONE else (lun, access)

    def _keep_contexts_for(self, name: str) -> None:
        # Contexts chosen with SET_META_CONTEXT apply only to the export they named.
        if self.meta_export != name:
            self.meta_contexts = {}


_HANDLERS: dict[int, Callable[[Negotiator, int, bytes], Outcome]] = {
    c.OPT_EXPORT_NAME: Negotiator._export_name,
    c.OPT_ABORT: Negotiator._abort,
    c.OPT_LIST: Negotiator._list,
    c.OPT_STARTTLS: Negotiator._starttls,
    c.OPT_INFO: Negotiator._info_or_go,
    c.OPT_GO: Negotiator._info_or_go,
    c.OPT_STRUCTURED_REPLY: Negotiator._structured_reply,
    c.OPT_LIST_META_CONTEXT: Negotiator._meta_context,
    c.OPT_SET_META_CONTEXT: Negotiator._meta_context,
}


def _unknown_export(option: int, name: str, lun: Lun | None) -> bytes:
    """ERR_UNKNOWN for a missing export, or one whose LUN cannot serve (with why)."""
    if lun is None:
        message = f"no export named {name!r}"
    else:
        message = f"export {lun.name!r} is unavailable: {lun.unavailable}"
    return codec.option_error(option, c.REP_ERR_UNKNOWN, message)


def describe(lun: Lun) -> str:
    return f"lunseal LUN {lun.record.number} ({lun.record.uuid})"


def transmission_flags(lun: Lun, *, structured: bool, read_only: bool = False) -> int:
    # MULTI_CONN is correct: every connection shares one file descriptor and
    # there is no per-connection cache, so a FLUSH on one covers all.
    flags = c.TF_HAS_FLAGS | c.TF_SEND_FLUSH | c.TF_SEND_CACHE | c.TF_CAN_MULTI_CONN
    if lun.read_only or read_only:
        flags |= c.TF_READ_ONLY
    else:
        flags |= c.TF_SEND_FUA | c.TF_SEND_TRIM | c.TF_SEND_WRITE_ZEROES | c.TF_SEND_FAST_ZERO
    if structured:
        flags |= c.TF_SEND_DF
    return flags
