"""The relay's fast path: runs of plain messages checked and forwarded in place.

Most traffic is messages whose arguments are 32-bit words (int, uint, fixed,
object, typed new_id), perhaps followed by strings and arrays: frame callbacks,
syncs, pointer motion, configure, titles, keyboard focus. For those the fast path
makes every check the full path makes (size, opcode, ``since``, nullability,
object liveness and interface, new_id range and reuse; a string's length, its
terminating and interior NULs, an array's length), updates the object map and the
id translation, and forwards a run of such messages as one slice of the input,
with no per-message objects. It hands anything else to the full path *before*
changing any state for it: fds, untyped new_ids, a word after a string or array,
padding that is not zeros (the full path writes zeros when it re-encodes), the
requests the shm bridge intercepts, the events the session rewrites, and every
message that fails a check, so that error codes and texts are the full path's own.
The differential test in ``tests/test_fastpath.py`` holds the two paths to the same
output.

This module's ``FastPath`` is the reference and the fallback: sessions run the compiled
core (``_fastpath.c``, the same loops and the common table work in C, on the same
tables) unless ``QUBESSHM_PURE_PYTHON=1`` or the core is not built, and ``serve``'s
start line says which (``select_fast_path``). ``tests/test_fastpath_core.py`` holds
the two to the same bytes, offsets and tables.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..objects.objectmap import DISPLAY_ID, SERVER_ID_MIN, ObjectMap
from ..shm.bridge import INTERCEPTED_REQUESTS
from ..wire.codec import HEADER, HEADER_SIZE
from ..wire.protocol import ArgKind, MessageSpec, ProtocolTable

if TYPE_CHECKING:
    from ..objects.idmap import UpstreamIds
    from .session import Outbox

_WORD_KINDS = frozenset({ArgKind.INT, ArgKind.UINT, ArgKind.FIXED, ArgKind.OBJECT,
                         ArgKind.NEW_ID})
_TAIL_KINDS = frozenset({ArgKind.STRING, ArgKind.ARRAY})
_U32 = struct.Struct("=I")
# Events the session rewrites or learns from; wl_display's delete_id has its own case.
_FULL_PATH_EVENTS = frozenset({("wl_registry", "global"), ("wl_registry", "global_remove"),
                               ("wl_shm", "format"), ("wl_display", "error")})


@dataclass(frozen=True, slots=True)
class WordPlan:
    """How the fast path handles one message signature: words, then a tail of strings
    and arrays."""

    size: int  # header plus one word per word argument: the size, or with a tail the least
    body: struct.Struct  # the words after the header, as the codec reads them
    objects: tuple[tuple[int, str | None, bool], ...]  # (word, interface, nullable)
    new_id: int  # the word that is a new id, -1 if none
    new_interface: str
    destructor: bool
    # Never fast: the shm bridge intercepts it (requests) or the session rewrites it.
    full_path: bool
    # The strings and arrays after the words: (is a string, may be null) each.
    tail: tuple[tuple[bool, bool], ...] = ()
    # The compiled core's reading of this plan, made there on first use.
    native: object = field(default=None, compare=False, repr=False)


def tail_fits(plan: WordPlan, buf: bytes, pos: int, size: int) -> bool:
    """Whether the message of ``size`` bytes at ``buf[pos]`` is ``plan``'s words and then
    exactly its strings and arrays, each as the full path would take it (a non-null
    string NUL-terminated with no other NUL), with zero padding."""
    end = pos + size
    pos += plan.size
    if pos > end:
        return False
    for is_string, nullable in plan.tail:
        if end - pos < 4:
            return False
        length = _U32.unpack_from(buf, pos)[0]
        pos += 4
        if length == 0:
            if is_string and not nullable:
                return False
            continue
        padded = (length + 3) & ~3
        if padded > end - pos:
            return False
        if is_string and (buf[pos + length - 1] != 0
                          or buf.find(b"\0", pos, pos + length - 1) >= 0):
            return False
        if buf.count(0, pos + length, pos + padded) != padded - length:
            return False
        pos += padded
    return pos == end


def _plan(spec: MessageSpec, full_path: bool) -> WordPlan | None:
    plan = spec.relay_plan
    if plan is None:
        words = len(spec.args)
        while words and spec.args[words - 1].kind in _TAIL_KINDS:
            words -= 1
        head, tail = spec.args[:words], spec.args[words:]
        if all(a.kind in _WORD_KINDS and not a.untyped_new_id for a in head):
            body = struct.Struct("=" + "".join(
                "i" if a.kind in (ArgKind.INT, ArgKind.FIXED) else "I" for a in head))
            plan = WordPlan(
                size=HEADER_SIZE + body.size, body=body,
                objects=tuple((i, a.interface, a.nullable) for i, a in spec.object_args),
                new_id=-1 if spec.new_id_index is None else spec.new_id_index,
                new_interface=("" if spec.new_id_index is None
                               else spec.args[spec.new_id_index].interface or ""),
                destructor=spec.destructor, full_path=full_path,
                tail=tuple((a.kind is ArgKind.STRING, a.nullable) for a in tail))
        else:
            plan = False
        object.__setattr__(spec, "relay_plan", plan)
    return plan if isinstance(plan, WordPlan) else None


def request_plan(spec: MessageSpec) -> WordPlan | None:
    return _plan(spec, (spec.interface, spec.name) in INTERCEPTED_REQUESTS)


def event_plan(spec: MessageSpec) -> WordPlan | None:
    return _plan(spec, (spec.interface, spec.name) in _FULL_PATH_EVENTS)


class FastPath:
    """The fast lane of one ``RelaySession``: it shares the session's state."""

    def __init__(self, protocol: ProtocolTable, objects: ObjectMap, ids: UpstreamIds, *,
                 intercepting: bool, max_message_size: int) -> None:
        self.protocol = protocol
        self.objects = objects
        self.ids = ids
        # Without the shm bridge (the plain relay) nothing is intercepted.
        self.intercepting = intercepting
        self.max_message_size = max_message_size
        self._delete_id = protocol["wl_display"].events[1]

    def requests(self, buf: bytes, pos: int, up: Outbox) -> int:
        """Relay requests from ``buf[pos:]`` into ``up`` until one needs the full path
        (or is incomplete); the offset of the first request not handled."""
        end = len(buf)
        entries = self.objects.entries
        to_upstream = self.ids.upstream_ids
        intercepting = self.intercepting
        max_size = self.max_message_size
        run = pos  # start of the bytes handled and not yet in ``up``
        # The framing and plan lookup below are written out again in ``events``: a
        # shared helper would add a Python call to every message on the hot path.
        while end - pos >= HEADER_SIZE:
            object_id, word = HEADER.unpack_from(buf, pos)
            size = word >> 16
            if size > end - pos or size < HEADER_SIZE or size & 3 or size > max_size:
                break
            obj = entries.get(object_id)
            if obj is None or not obj.alive:
                break
            messages = obj.interface.requests
            opcode = word & 0xFFFF
            if opcode >= len(messages):
                break
            spec = messages[opcode]
            plan = spec.relay_plan
            if not isinstance(plan, WordPlan):
                plan = request_plan(spec)
                if plan is None:
                    break
            if (spec.since > obj.version or (plan.full_path and intercepting)
                    or (size != plan.size if not plan.tail
                        else not tail_fits(plan, buf, pos, size))):
                break
            target = object_id if object_id >= SERVER_ID_MIN else to_upstream.get(object_id)
            if target is None:
                break
            words = plan.body.unpack_from(buf, pos + HEADER_SIZE)
            changed = target != object_id
            translated: list[int] | None = None
            ok = True
            for index, interface, nullable in plan.objects:
                value = words[index]
                if not value:
                    if nullable:
                        continue
                    ok = False
                    break
                referred = entries.get(value)
                if (referred is None or not referred.alive
                        or (interface is not None and referred.interface.name != interface)):
                    ok = False
                    break
                upstream = value if value >= SERVER_ID_MIN else to_upstream.get(value)
                if upstream is None:
                    ok = False
                    break
                if upstream != value:
                    if translated is None:
                        translated = list(words)
                    translated[index] = upstream
            if not ok:
                break
            if plan.new_id >= 0:
                new_id = words[plan.new_id]
                created = self.protocol.get(plan.new_interface)
                if (created is None or not self.objects.accepts_client_id(new_id)
                        or new_id in to_upstream):
                    break
                # Every check passed: from here on the message is relayed.
                self.objects.create_by_client(new_id, created, obj.version)
                upstream = self.ids.add_client_object(new_id)
                if upstream != new_id:
                    if translated is None:
                        translated = list(words)
                    translated[plan.new_id] = upstream
            if plan.destructor:
                self.objects.destroyed(obj, by_compositor=False)
                self.ids.destroyed(target)
            if changed or translated is not None:
                if run < pos:
                    up.add(buf[run:pos], [])
                up.add(HEADER.pack(target, word)
                       + plan.body.pack(*(words if translated is None else translated))
                       + buf[pos + plan.size:pos + size], [])
                run = pos + size
            pos += size
        if run < pos:
            up.add(buf[run:pos], [])
        return pos

    def events(self, buf: bytes, pos: int, down: Outbox) -> int:
        """Relay events from ``buf[pos:]`` into ``down`` until one needs the full path
        (or is incomplete); the offset of the first event not handled."""
        end = len(buf)
        entries = self.objects.entries
        ids = self.ids
        slots = ids.slots
        max_size = self.max_message_size
        delete_id = self._delete_id
        run = pos
        while end - pos >= HEADER_SIZE:
            upstream_id, word = HEADER.unpack_from(buf, pos)
            size = word >> 16
            if size > end - pos or size < HEADER_SIZE or size & 3 or size > max_size:
                break
            if upstream_id >= SERVER_ID_MIN:
                client_id = upstream_id
            else:
                slot = slots.get(upstream_id)
                if slot is None or slot.client_id is None:
                    break  # unknown (an error) or one of the proxy's own objects
                client_id = slot.client_id
            obj = entries.get(client_id)
            if obj is None:
                break
            messages = obj.interface.events
            opcode = word & 0xFFFF
            if opcode >= len(messages):
                break
            spec = messages[opcode]
            plan = spec.relay_plan
            if not isinstance(plan, WordPlan):
                plan = event_plan(spec)
                if plan is None:
                    break
            if plan.full_path or (size != plan.size if not plan.tail
                                  else not tail_fits(plan, buf, pos, size)):
                break
            words = plan.body.unpack_from(buf, pos + HEADER_SIZE)
            translated: list[int] | None = None
            if spec is delete_id:
                if client_id != DISPLAY_ID:
                    break
                deleted = words[0]
                if deleted == DISPLAY_ID or deleted >= SERVER_ID_MIN:
                    break
                gone = slots.get(deleted)
                if gone is None or gone.client_id is None:
                    break
                ids.delete_id(deleted)
                self.objects.delete_id(gone.client_id)
                if gone.client_id != deleted:
                    translated = [gone.client_id]
            else:
                ok = True
                for index, _, nullable in plan.objects:
                    if not words[index] and not nullable:
                        ok = False
                        break
                if not ok:
                    break
                if plan.new_id >= 0:
                    new_id = words[plan.new_id]
                    created = self.protocol.get(plan.new_interface)
                    known = entries.get(new_id)
                    if (created is None or new_id < SERVER_ID_MIN
                            or (known is not None and known.alive)):
                        break
                if not ids.identical():
                    for index, _, _ in plan.objects:
                        value = words[index]
                        if not value or value >= SERVER_ID_MIN:
                            continue
                        owner = slots.get(value)
                        if owner is None or owner.client_id is None:
                            ok = False  # an object the client does not know: an error
                            break
                        if owner.client_id != value:
                            if translated is None:
                                translated = list(words)
                            translated[index] = owner.client_id
                    if not ok:
                        break
                # Every check passed: from here on the event is relayed.
                if plan.new_id >= 0:
                    assert created is not None
                    self.objects.create_by_server(words[plan.new_id], created, obj.version)
                if plan.destructor:
                    self.objects.destroyed(obj, by_compositor=True)
            if translated is not None or client_id != upstream_id:
                if run < pos:
                    down.add(buf[run:pos], [])
                down.add(HEADER.pack(client_id, word)
                         + plan.body.pack(*(words if translated is None else translated))
                         + buf[pos + plan.size:pos + size], [])
                run = pos + size
            pos += size
        if run < pos:
            down.add(buf[run:pos], [])
        return pos


class Relay(Protocol):
    """A fast path: this module's ``FastPath`` or the compiled core's
    (``qubesshm.relay._fastpath.FastPath``), which the session cannot tell apart."""

    def requests(self, buf: bytes, pos: int, up: Outbox, /) -> int: ...

    def events(self, buf: bytes, pos: int, down: Outbox, /) -> int: ...


class RelayFactory(Protocol):
    def __call__(self, protocol: ProtocolTable, objects: ObjectMap, ids: UpstreamIds, *,
                 intercepting: bool, max_message_size: int) -> Relay: ...


PURE_PYTHON_VARIABLE = "QUBESSHM_PURE_PYTHON"


def _compiled() -> tuple[RelayFactory | None, str]:
    try:
        from . import _fastpath
    except ImportError as exc:
        return None, f"pure Python (the compiled core is not built: {exc})"
    return _fastpath.FastPath, "compiled"


_COMPILED = _compiled()


def select_fast_path() -> tuple[RelayFactory, str]:
    """The fast path sessions use, and how ``serve``'s start line names it: the compiled
    core unless ``QUBESSHM_PURE_PYTHON=1`` asks for this module's (or it is not built)."""
    if os.environ.get(PURE_PYTHON_VARIABLE) == "1":
        return FastPath, f"pure Python ({PURE_PYTHON_VARIABLE}=1)"
    factory, name = _COMPILED
    return (FastPath, name) if factory is None else (factory, name)
