"""The simulated hypervisor's grant hypercalls for domains in other processes.

A ``SimHypervisor`` lives in the process that booted it (the agent, a VM). The
GUI domain that maps the VM's grants runs elsewhere (the GUI-daemon emulator, as
dom0 is another machine to a VM), so the process owning the hypervisor serves
hypercalls on ``<kernel dir>/hypervisor.sock`` (mode 0600 in the kernel's private
directory) and notes which domains it hosts; ``connect_foreign`` finds that
kernel by the granter's domain id and maps through it.

Requests and replies are length-prefixed frames on a stream socket, one request
at a time: ``hello`` (the mapper's domain id, once, first), ``map`` (granter,
refs, writable) answered with the pages' fd by ``SCM_RIGHTS`` (opened read-only
unless writable, so the mapper cannot write through it), ``unmap`` (a mapping
id) and ``watch`` (a pid); and for the host half of a split proxy, event channels
as ``/dev/xen/evtchn`` has them (``bind_interdomain`` to a port the granter left
unbound, ``unbind``, ``notify``) and ``set_notify``, gntdev's
``IOCTL_GNTDEV_SET_UNMAP_NOTIFY`` on a mapping: clear a byte and/or signal a port
of this connection's once the mapping is gone. A foreign mapping counts in the
hypervisor exactly as ``SimBackend.map`` does (a hold per grant, the grantee
check), so ending a grant the foreign domain still maps defers, and its notify
holds its port as ``SimBackend.set_map_notify`` does (the kernel's ``evtchn_get``):
unbinding that port only closes it once the notify has been sent. A connection
that closes, however its process ends, unmaps everything it mapped (what its
processes still have mmapped stays mapped until they munmap it or exit, as with
gntdev; notifies fire as each mapping goes), then unbinds its ports.

Decisions:
- On Xen a gntdev mapping outlives the unmap ioctl while the pages are mmapped.
  So the hypervisor watches the mapper's own process (``SO_PEERCRED``) from its
  hello on: its mmaps of granted pages count as mappings, as for a compositor in
  proxy mode, until the connection closes. ``watch(pid)`` adds another process:
  an X server given the fd through MIT-SHM (``ShmAttachFd``) maps the pages as
  Qubes' X server does through its shmoverride, and holds them until it detaches.
  A watch covers every granted page that process maps, whoever the grantee, and
  outlives the connection until the process maps no granted page (seen at once
  and at each ``SimHypervisor.refresh``, which the owner's timer already calls).
- The server has no threads: ``fileno()`` is an epoll fd readable when any of its
  sockets is, ``on_readable()`` does the work ready, ``start(loop)`` hands both to
  asyncio. The protocol itself (``HypercallSession``, ``FrameReader``) is sans-IO.
- A malformed request gets an error reply (an errno and a line); a frame longer
  than any request, or a client that does not read its replies, is dropped.
  Neither changes anything but that client's own mappings.
- ``set_notify`` names a mapping by its id (each has an fd of its own, where
  gntdev takes a byte index into one fd's mappings) and is stricter than gntdev
  where gntdev ignores input: a byte offset or port whose flag is not set must be
  0. As in gntdev, a read-only mapping cannot clear a byte. Ports are the
  connection's own: unbind and notify answer ``ENOTCONN`` for any other, as evtchn
  does for a port its fd did not bind.
- The mapper's domain id is claimed, not proven: the socket is the user's own
  (as the socket vchan's domain ids are).
- Limits of the simulation: a read-only fd of a memfd can be reopened writable
  through ``/proc/self/fd``, and the fd shows the whole share even when fewer of
  its pages were mapped; the emulator is trusted not to reach past what it mapped.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

from .api import PAGE_SIZE, UnmapNotify
from .files import check_private_dir
from .mapping import peer_pid
from .simkernels import HYPERCALL_SOCKET, KernelDir, RunningKernel, running_kernels, sim_base
from .simulated import SimHypervisor, _Mapping

log = logging.getLogger("qubesshm.grants")

DOMID_FIRST_RESERVED = 0x7FF0  # Xen's first domain id that names no domain
MAX_REFS = 1 << 20  # more than any window's pages (16384 x 6144 x 4 bytes: 98304)
_LENGTH = struct.Struct("<I")
_OP = struct.Struct("<I")
_HELLO = struct.Struct("<I")  # mapper domid
_MAP = struct.Struct("<IB")  # granter domid, writable; then the refs, <I each
_UNMAP = struct.Struct("<Q")  # mapping id
_WATCH = struct.Struct("<I")  # pid
_BIND = struct.Struct("<II")  # remote domid, remote port
_PORT = struct.Struct("<I")  # a local port: unbind's, notify's, bind_interdomain's reply
_SET_NOTIFY = struct.Struct("<QIII")  # mapping id, flags, byte offset, port
_STATUS = struct.Struct("<I")  # 0, or the errno of the failure (a line follows)
_MAPPED = struct.Struct("<QQ")  # mapping id, size in bytes
# set_notify's flags, as UNMAP_NOTIFY_CLEAR_BYTE and UNMAP_NOTIFY_SEND_EVENT.
NOTIFY_CLEAR_BYTE = 1
NOTIFY_SEND_EVENT = 2
MAX_FRAME = _OP.size + _MAP.size + 4 * MAX_REFS
READ_SIZE = 65536
READS_PER_WAKE = 16  # per connection, so one busy client cannot starve the rest


class Op(IntEnum):
    HELLO = 1
    MAP = 2
    UNMAP = 3
    WATCH = 4
    BIND_INTERDOMAIN = 5
    UNBIND = 6
    SET_NOTIFY = 7
    NOTIFY = 8


class FrameError(Exception):
    """The stream is not framed as hypercalls are; the connection ends."""


class FrameReader:
    """Bytes in, whole frames out (sans-IO)."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > self.max_frame:
                raise FrameError(f"a frame of {length} bytes (at most {self.max_frame})")
            end = _LENGTH.size + length
            if len(self._buffer) < end:
                break
            frames.append(bytes(self._buffer[_LENGTH.size:end]))
            del self._buffer[:end]
        return frames


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def encode_request(op: Op, body: bytes = b"") -> bytes:
    return frame(_OP.pack(op) + body)


class Reply(NamedTuple):
    """A framed reply, and the fd to send with it (the sender closes it after)."""

    data: bytes
    fd: int | None = None


def _error(code: int, text: str) -> Reply:
    return Reply(frame(_STATUS.pack(code) + text.encode(errors="replace")))


def _ok(body: bytes = b"", fd: int | None = None) -> Reply:
    return Reply(frame(_STATUS.pack(0) + body), fd)


class HypercallSession:
    """One foreign domain's connection to the hypervisor: frames in, replies out."""

    def __init__(self, hypervisor: SimHypervisor, pid: int | None) -> None:
        self.hv = hypervisor
        self.pid = pid  # the peer process, None where unknown
        self.mapper: int | None = None
        self.mappings: dict[int, _Mapping] = {}
        self.watching: list[int] = []
        self.ports: set[int] = set()  # event channel ports this connection bound
        self._next_id = 1
        self.closed = False

    def handle(self, request: bytes) -> Reply:
        if self.closed:
            return _error(errno.EBADF, "the connection is closed")
        if len(request) < _OP.size:
            return _error(errno.EINVAL, "a request with no operation")
        (op,) = _OP.unpack_from(request)
        body = request[_OP.size:]
        try:
            if op == Op.HELLO:
                return self._hello(body)
            if self.mapper is None:
                return _error(errno.EPROTO, "say hello (the mapping domain's id) first")
            if op == Op.MAP:
                return self._map(body)
            if op == Op.UNMAP:
                return self._unmap(body)
            if op == Op.WATCH:
                return self._watch(body)
            if op == Op.BIND_INTERDOMAIN:
                return self._bind_interdomain(body)
            if op == Op.UNBIND:
                return self._unbind(body)
            if op == Op.SET_NOTIFY:
                return self._set_notify(body)
            if op == Op.NOTIFY:
                return self._notify(body)
        except OSError as exc:
            return _error(exc.errno or errno.EIO, exc.strerror or str(exc))
        return _error(errno.ENOSYS, f"no hypercall {op}")

    def _hello(self, body: bytes) -> Reply:
        if self.mapper is not None:
            return _error(errno.EPROTO, f"already domain {self.mapper}")
        if len(body) != _HELLO.size:
            return _error(errno.EINVAL, f"hello takes {_HELLO.size} bytes, not {len(body)}")
        (domid,) = _HELLO.unpack(body)
        if domid >= DOMID_FIRST_RESERVED:
            return _error(errno.EINVAL, f"{domid} is not a domain id")
        # Its own mmaps hold what it maps, as gntdev's do; the sharer's own process is
        # never foreign (its views of the pages it shares are not mappings).
        if self.pid is not None and self.pid != os.getpid():
            self.hv.watch(self.pid)
            self.watching.append(self.pid)
        self.mapper = domid
        return _ok()

    def _map(self, body: bytes) -> Reply:
        assert self.mapper is not None
        if len(body) < _MAP.size + 4 or (len(body) - _MAP.size) % 4:
            return _error(errno.EINVAL, "map takes a domain, a writable flag and refs")
        granter, writable = _MAP.unpack_from(body)
        if writable not in (0, 1):
            return _error(errno.EINVAL, f"writable is 0 or 1, not {writable}")
        refs = array.array("I")
        refs.frombytes(body[_MAP.size:])
        if len(refs) > MAX_REFS:
            return _error(errno.E2BIG, f"{len(refs)} refs (at most {MAX_REFS})")
        mapping = self.hv.open_mapping(self.mapper, [(granter, ref) for ref in refs],
                                       bool(writable))
        mapping_id = self._next_id
        self._next_id += 1
        self.mappings[mapping_id] = mapping
        # The caller sends the fd and closes it: this side needs none to hold the grants.
        fd, mapping.area.fd = mapping.area.fd, -1
        return _ok(_MAPPED.pack(mapping_id, len(refs) * PAGE_SIZE), fd)

    def _unmap(self, body: bytes) -> Reply:
        if len(body) != _UNMAP.size:
            return _error(errno.EINVAL, f"unmap takes {_UNMAP.size} bytes, not {len(body)}")
        (mapping_id,) = _UNMAP.unpack(body)
        mapping = self.mappings.pop(mapping_id, None)
        if mapping is None:
            return _error(errno.EINVAL, f"no mapping {mapping_id} on this connection")
        self.hv.release_mapping(mapping)
        return _ok()

    def _watch(self, body: bytes) -> Reply:
        if len(body) != _WATCH.size:
            return _error(errno.EINVAL, f"watch takes {_WATCH.size} bytes, not {len(body)}")
        (pid,) = _WATCH.unpack(body)
        if pid == 0 or not os.path.exists(f"/proc/{pid}"):
            return _error(errno.ESRCH, f"no process {pid}")
        if pid == os.getpid():
            return _error(errno.EINVAL, "the hypervisor's own process maps no foreign pages")
        self.hv.watch(pid)
        self.watching.append(pid)
        return _ok()

    def _bind_interdomain(self, body: bytes) -> Reply:
        assert self.mapper is not None
        if len(body) != _BIND.size:
            return _error(errno.EINVAL, f"bind_interdomain takes {_BIND.size} bytes, "
                          f"not {len(body)}")
        remote_domid, remote_port = _BIND.unpack(body)
        if remote_domid >= DOMID_FIRST_RESERVED:
            return _error(errno.EINVAL, f"{remote_domid} is not a domain id")
        port = self.hv.bind_interdomain(self.mapper, remote_domid, remote_port)
        self.ports.add(port)
        return _ok(_PORT.pack(port))

    def _own_port(self, body: bytes, what: str) -> int:
        """The port a request names, if this connection bound it (else as evtchn says)."""
        if len(body) != _PORT.size:
            raise OSError(errno.EINVAL, f"{what} takes {_PORT.size} bytes, not {len(body)}")
        (port,) = _PORT.unpack(body)
        if port not in self.ports:
            raise OSError(errno.ENOTCONN, f"port {port} is not bound on this connection")
        return int(port)

    def _unbind(self, body: bytes) -> Reply:
        assert self.mapper is not None
        port = self._own_port(body, "unbind")
        # Whatever the hypervisor says, the port is no longer this connection's to use.
        self.ports.discard(port)
        self.hv.unbind(self.mapper, port)
        return _ok()

    def _notify(self, body: bytes) -> Reply:
        assert self.mapper is not None
        self.hv.notify(self.mapper, self._own_port(body, "notify"))
        return _ok()

    def _set_notify(self, body: bytes) -> Reply:
        """gntdev's IOCTL_GNTDEV_SET_UNMAP_NOTIFY: replaces the mapping's notify, holding
        the new port before letting go of the old one (it may be the same port)."""
        assert self.mapper is not None
        if len(body) != _SET_NOTIFY.size:
            return _error(errno.EINVAL, f"set_notify takes {_SET_NOTIFY.size} bytes, "
                          f"not {len(body)}")
        mapping_id, flags, offset, port = _SET_NOTIFY.unpack(body)
        mapping = self.mappings.get(mapping_id)
        if mapping is None:
            return _error(errno.EINVAL, f"no mapping {mapping_id} on this connection")
        if flags & ~(NOTIFY_CLEAR_BYTE | NOTIFY_SEND_EVENT):
            return _error(errno.EINVAL, f"unknown notify flags {flags:#x}")
        clear, send = flags & NOTIFY_CLEAR_BYTE, flags & NOTIFY_SEND_EVENT
        size = mapping.area.size
        if clear and not mapping.area.writable:
            return _error(errno.EINVAL, "a read-only mapping cannot clear a byte")
        if clear and offset >= size:
            return _error(errno.EINVAL, f"notify byte {offset} is outside the {size}-byte "
                          "mapping")
        if not clear and offset:
            return _error(errno.EINVAL, "a byte offset without the clear-byte flag")
        if send and port not in self.ports:
            return _error(errno.EINVAL, f"port {port} is not bound on this connection")
        if not send and port:
            return _error(errno.EINVAL, "a port without the send-event flag")
        held = self.hv.hold_port(self.mapper, port) if send else None
        if mapping.notify_port is not None:
            self.hv.release_port(mapping.notify_port)
        mapping.notify_port = held
        mapping.area.notify = UnmapNotify(offset if clear else None, port if send else None)
        return _ok()

    def close(self) -> None:
        """The connection is gone: everything it mapped or watched is let go, then its
        ports are unbound (a notify that went out with its mapping reached the other
        end first; one still waiting on a process's mmap keeps its port until sent)."""
        if self.closed:
            return
        self.closed = True
        for mapping in self.mappings.values():
            self.hv.release_mapping(mapping)
        self.mappings.clear()
        if self.mapper is not None:
            for port in sorted(self.ports):
                # Gone already only if the same domain's backend here unbound it.
                with contextlib.suppress(OSError):
                    self.hv.unbind(self.mapper, port)
        self.ports.clear()
        for pid in self.watching:
            self.hv.unwatch_when_unmapped(pid)
        self.watching.clear()


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    session: HypercallSession
    reader: FrameReader = field(default_factory=FrameReader)


class HypercallServer:
    """Serves ``hypervisor`` to domains in other processes on the Unix socket ``path``."""

    def __init__(self, hypervisor: SimHypervisor, path: Path, backlog: int = 16) -> None:
        self.hv = hypervisor
        self.path = path
        if len(os.fsencode(path)) >= 108:
            raise OSError(errno.ENAMETOOLONG, f"the hypercall socket path {path} is too long "
                          "for a Unix socket: point QUBESSHM_SIM_ROOT at a shorter directory")
        check_private_dir(path.parent, "the simulated kernel's directory")
        self._sock = socket.socket(socket.AF_UNIX,
                                   socket.SOCK_STREAM | socket.SOCK_CLOEXEC
                                   | socket.SOCK_NONBLOCK)
        try:
            self._sock.bind(str(path))
            # No one else may even enter the directory, so the moment before chmod is safe.
            os.chmod(path, 0o600)
            self._sock.listen(backlog)
        except BaseException:
            self._sock.close()
            path.unlink(missing_ok=True)
            raise
        self._epoll = select.epoll()
        self._epoll.register(self._sock.fileno(), select.EPOLLIN)
        self._connections: dict[int, _Connection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    def fileno(self) -> int:
        """Readable while a connection or a request waits: then call ``on_readable``."""
        return self._epoll.fileno()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let ``loop`` drive the server until ``close``."""
        loop.add_reader(self.fileno(), self.on_readable)
        self._loop = loop

    def on_readable(self) -> None:
        for fd, _ in self._epoll.poll(0):
            if fd == self._sock.fileno():
                self._accept()
                continue
            connection = self._connections.get(fd)
            if connection is not None:
                try:
                    self._serve(connection)
                except Exception:
                    # A bug must cost one connection, never the hypervisor's process.
                    log.exception("a hypercall connection failed")
                    self._drop(connection)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("cannot accept a hypercall connection: %s", exc.strerror or exc)
                return
            sock.setblocking(False)
            connection = _Connection(sock, HypercallSession(self.hv, peer_pid(sock)))
            self._connections[sock.fileno()] = connection
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _serve(self, connection: _Connection) -> None:
        for _ in range(READS_PER_WAKE):
            try:
                data = connection.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop(connection)
                return
            try:
                requests = connection.reader.feed(data)
            except FrameError as exc:
                log.warning("hypercalls: dropped a connection from domain %s: %s",
                            connection.session.mapper, exc)
                self._drop(connection)
                return
            for request in requests:
                if not self._send(connection, connection.session.handle(request)):
                    self._drop(connection)
                    return

    @staticmethod
    def _send(connection: _Connection, reply: Reply) -> bool:
        """Send all of ``reply`` now; False if the client does not take it."""
        try:
            if reply.fd is None:
                sent = connection.sock.send(reply.data)
            else:
                rights = array.array("i", [reply.fd])
                sent = connection.sock.sendmsg(
                    [reply.data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        except OSError:
            # Full (a client that sends requests without reading the replies) or gone.
            return False
        finally:
            if reply.fd is not None:
                os.close(reply.fd)
        return sent == len(reply.data)

    def _drop(self, connection: _Connection) -> None:
        fd = connection.sock.fileno()
        if self._connections.pop(fd, None) is None:
            return
        self._epoll.unregister(fd)
        connection.sock.close()
        connection.session.close()

    def close(self) -> None:
        """Stop serving: every connection ends (its mappings go) and the socket is removed."""
        if self._loop is not None:
            self._loop.remove_reader(self.fileno())
            self._loop = None
        if self._sock.fileno() < 0:
            return
        for connection in list(self._connections.values()):
            self._drop(connection)
        self._epoll.close()
        self._sock.close()
        self.path.unlink(missing_ok=True)


def serve_hypercalls(kernel_dir: KernelDir, hypervisor: SimHypervisor,
                     domains: Sequence[int] | None = None) -> HypercallServer:
    """Serve ``hypervisor`` at ``<kernel dir>/hypervisor.sock`` and note the domains it
    hosts (default: those with a backend on it now), so ``connect_foreign`` finds it."""
    server = HypercallServer(hypervisor, kernel_dir.root / HYPERCALL_SOCKET)
    try:
        kernel_dir.note_domains(hypervisor.domains if domains is None else domains)
    except BaseException:
        server.close()
        raise
    return server


# -- the foreign domain's side ---------------------------------------------------------------


class ForeignKernelError(RuntimeError):
    """No single running simulated kernel hosts the domain asked for; one line."""


class ForeignMapping(NamedTuple):
    """Foreign pages mapped: ``fd`` is mmappable at offset 0 for ``size`` bytes."""

    id: int
    fd: int
    size: int


class ForeignMapper:
    """A domain in this process mapping grants through another process's hypervisor.

    Blocking: each call waits for its reply (at most ``timeout`` seconds)."""

    def __init__(self, sock: socket.socket, mapper_domid: int, *, what: str = "") -> None:
        self.sock = sock
        self.domid = mapper_domid
        self.what = what or "the simulated hypervisor"
        self._reader = FrameReader()
        self.mappings: dict[int, ForeignMapping] = {}
        self.ports: set[int] = set()  # event channel ports bound through this connection
        self._call(Op.HELLO, _HELLO.pack(mapper_domid))

    def map(self, granter_domid: int, refs: Sequence[int], writable: bool = False
            ) -> ForeignMapping:
        """Map ``refs`` of ``granter_domid`` (the leading pages of one shared area, in
        order); read-only unless ``writable``. Refused as Xen would: ``OSError``."""
        body = _MAP.pack(granter_domid, int(writable)) + array.array("I", refs).tobytes()
        reply, fd = self._call(Op.MAP, body, want_fd=True)
        if fd is None or len(reply) != _MAPPED.size:
            if fd is not None:
                os.close(fd)
            raise OSError(errno.EPROTO, f"{self.what} sent a malformed map reply")
        mapping_id, size = _MAPPED.unpack(reply)
        mapping = ForeignMapping(mapping_id, fd, size)
        self.mappings[mapping_id] = mapping
        return mapping

    def unmap(self, mapping: ForeignMapping) -> None:
        """Let go of the mapping and close its fd (munmap it first: while this process
        still maps the pages, the grants stay mapped, as with gntdev)."""
        if self.mappings.pop(mapping.id, None) is None:
            raise OSError(errno.EINVAL, f"mapping {mapping.id} is not mapped here")
        os.close(mapping.fd)
        self._call(Op.UNMAP, _UNMAP.pack(mapping.id))

    def watch(self, pid: int) -> None:
        """Count process ``pid``'s mmaps of granted pages as this domain's mappings (an
        X server given a mapping's fd) until this connection closes."""
        self._call(Op.WATCH, _WATCH.pack(pid))

    def set_notify(self, mapping: ForeignMapping, *, clear_byte: int | None = None,
                   event_port: int | None = None) -> None:
        """Once ``mapping`` is gone (unmapped here and munmapped by every watched
        process), zero its byte at ``clear_byte`` and signal ``event_port`` (a port
        bound here). Replaces the mapping's previous notify; neither: none."""
        if mapping.id not in self.mappings:
            raise OSError(errno.EINVAL, f"mapping {mapping.id} is not mapped here")
        flags = ((NOTIFY_CLEAR_BYTE if clear_byte is not None else 0)
                 | (NOTIFY_SEND_EVENT if event_port is not None else 0))
        self._call(Op.SET_NOTIFY, _pack(_SET_NOTIFY, "set_notify", mapping.id, flags,
                                        clear_byte or 0, event_port or 0))

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """A local port connected to ``remote_port``, which ``remote_domid`` left unbound
        for this domain."""
        reply, _ = self._call(Op.BIND_INTERDOMAIN,
                              _pack(_BIND, "bind_interdomain", remote_domid, remote_port))
        if len(reply) != _PORT.size:
            raise OSError(errno.EPROTO, f"{self.what} sent a malformed bind reply")
        port = int(_PORT.unpack(reply)[0])
        self.ports.add(port)
        return port

    def unbind(self, port: int) -> None:
        """Close a port bound here; a notify armed on it still goes out first."""
        self.ports.discard(port)
        self._call(Op.UNBIND, _pack(_PORT, "unbind", port))

    def notify(self, port: int) -> None:
        """Signal the other end of a port bound here."""
        self._call(Op.NOTIFY, _pack(_PORT, "notify", port))

    def close(self) -> None:
        """Every mapping and port goes with the connection."""
        for mapping in self.mappings.values():
            os.close(mapping.fd)
        self.mappings.clear()
        self.ports.clear()
        self.sock.close()

    def __enter__(self) -> ForeignMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, op: Op, body: bytes, *, want_fd: bool = False) -> tuple[bytes, int | None]:
        fds: list[int] = []
        try:
            self.sock.sendall(encode_request(op, body))
            frames: list[bytes] = []
            while not frames:
                data, ancdata, _, _ = self.sock.recvmsg(
                    READ_SIZE, socket.CMSG_SPACE(array.array("i").itemsize),
                    socket.MSG_CMSG_CLOEXEC)
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        received = array.array("i")
                        received.frombytes(payload[:len(payload) - len(payload) % 4])
                        fds.extend(received)
                if not data:
                    raise OSError(errno.ECONNRESET, f"{self.what} went away")
                frames = self._reader.feed(data)
        except TimeoutError as exc:
            _close_all(fds)
            raise OSError(errno.ETIMEDOUT, f"{self.what} did not answer") from exc
        except (OSError, FrameError) as exc:
            _close_all(fds)
            if isinstance(exc, OSError) and exc.strerror:
                raise
            raise OSError(errno.EPROTO, f"{self.what}: {exc}") from exc
        if len(frames) != 1 or len(frames[0]) < _STATUS.size or len(fds) > int(want_fd):
            _close_all(fds)
            raise OSError(errno.EPROTO, f"{self.what} sent a malformed reply")
        (status,) = _STATUS.unpack_from(frames[0])
        rest = frames[0][_STATUS.size:]
        if status:
            _close_all(fds)
            raise OSError(status, rest.decode(errors="replace"))
        return rest, fds[0] if fds else None


def _pack(layout: struct.Struct, what: str, *values: int) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise OSError(errno.EINVAL, f"{what}: {exc}") from exc


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def connect_path(path: Path, mapper_domid: int, *, timeout: float = 30.0) -> ForeignMapper:
    """A ``ForeignMapper`` for domain ``mapper_domid`` on the hypercall socket ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return ForeignMapper(sock, mapper_domid, what=f"the simulated hypervisor at {path}")
    except BaseException:
        sock.close()
        raise


def find_kernel(granter_domid: int, base: Path | None = None) -> RunningKernel:
    """The one running simulated kernel that serves hypercalls and hosts ``granter_domid``."""
    base = sim_base() if base is None else base
    found = [k for k in running_kernels(base)
             if k.hypercalls is not None and granter_domid in k.domains]
    if not found:
        raise ForeignKernelError(
            f"no running simulated kernel under {base} hosts domain {granter_domid}: start "
            f"the agent with --domid {granter_domid} first, with the same XDG_RUNTIME_DIR "
            "(or QUBESSHM_SIM_ROOT)")
    if len(found) > 1:
        pids = ", ".join(str(k.pid) for k in found)
        raise ForeignKernelError(
            f"{len(found)} running simulated kernels under {base} host domain {granter_domid} "
            f"(processes {pids}): give each agent a domain id of its own (--domid)")
    return found[0]


def connect_foreign(mapper_domid: int, *, granter_domid: int, base: Path | None = None,
                    timeout: float = 30.0) -> ForeignMapper:
    """Map as domain ``mapper_domid`` the grants of ``granter_domid``, through the running
    simulated kernel hosting it (under ``base``, default ``sim_base()``)."""
    kernel = find_kernel(granter_domid, base)
    assert kernel.hypercalls is not None
    try:
        return connect_path(kernel.hypercalls, mapper_domid, timeout=timeout)
    except OSError as exc:
        raise ForeignKernelError(
            f"cannot reach the simulated kernel of process {kernel.pid} hosting domain "
            f"{granter_domid} ({kernel.hypercalls}): {exc.strerror or exc}") from exc
