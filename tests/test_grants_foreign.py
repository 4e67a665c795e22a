"""The host half's grant backend (``ForeignBackend``) in a process of its own, as dom0.

The test process is the VM side: it boots the simulated hypervisor (its clock
injected), is domain 1 (a ``SimBackend`` under a ``SharingHalf``) and serves
hypercalls. The host is a separate Python process that connects with
``connect_sim_host``, binds to the port the VM left unbound, maps the VM's pages,
arms the unmap notify and mmaps them, answering one line per command; the test
serves hypercalls while it waits for each answer, as the VM's loop would.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kernels import Clock, DomainProcess, serve_until

from qubesshm.grants.api import PAGE_SIZE, Unshared
from qubesshm.grants.foreign import connect_sim_host
from qubesshm.grants.hypercalls import ForeignKernelError, HypercallServer, serve_hypercalls
from qubesshm.grants.sharing import Grant, SharingHalf
from qubesshm.grants.simkernels import KernelDir
from qubesshm.grants.simulated import SimBackend, SimHypervisor

REPO = Path(__file__).resolve().parent.parent
VM, HOST = 1, 0
DEADLINE = 30.0
PAGES = 3
LAST = PAGES * PAGE_SIZE - 1  # the notify byte: the last byte of the pool

# The host: one command a line on stdin, one answer a line on stdout.
HOST_SCRIPT = r"""
import errno, mmap, os, select, subprocess, sys
from pathlib import Path
from qubesshm.grants.api import UnmapNotify
from qubesshm.grants.foreign import connect_sim_host
from qubesshm.grants.hypercalls import ForeignKernelError

COMPOSITOR = "import mmap, sys; m = mmap.mmap(int(sys.argv[1]), int(sys.argv[2]), " \
    "prot=mmap.PROT_READ); print('held', flush=True); sys.stdin.read()"

def say(*words):
    print(*words, flush=True)

def pattern(seed, size):
    return bytes((seed + i) % 251 for i in range(size))

own, granter, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
try:
    backend = connect_sim_host(own, granter, None if where == "-" else Path(where))
except ForeignKernelError as exc:
    say("refused", exc)
    sys.exit(0)
say("ready")
areas, views, compositors = {}, {}, {}
for line in sys.stdin:
    command, *args = line.split()
    n = int(args[0]) if args else 0
    try:
        if command == "bind":
            say("port", backend.bind_interdomain(granter, n))
        elif command == "map":
            area = backend.map([(granter, int(ref)) for ref in args])
            key = len(areas) + 1
            areas[key] = area
            views[key] = mmap.mmap(area.fd, area.size)
            say("mapped", key, area.size, area.index)
        elif command == "map-mixed":
            backend.map([(granter, n), (granter + 1, n + 1)])
            say("mapped")
        elif command == "arm":
            backend.set_map_notify(areas[n], UnmapNotify(int(args[1]), int(args[2])))
            say("ok")
        elif command == "fill":
            view = views[n]
            view[:len(view) - 1] = pattern(int(args[1]), len(view) - 1)
            say("ok")
        elif command == "munmap":
            views.pop(n).close()
            say("ok")
        elif command == "unmap":
            backend.unmap(areas[n])
            say("ok")
        elif command == "unbind":
            backend.unbind(n)
            say("ok")
        elif command == "notify":
            backend.notify(n)
            say("ok")
        elif command == "compositor":
            fd = areas[n].fd
            proc = subprocess.Popen([sys.executable, "-c", COMPOSITOR, str(fd),
                                     str(areas[n].size)], pass_fds=[fd],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            proc.stdout.readline()
            compositors[proc.pid] = proc
            backend.watch(proc.pid)
            say("compositor", proc.pid)
        elif command == "let-go":
            proc = compositors.pop(n)
            proc.stdin.close()
            proc.wait()
            say("ok")
        elif command == "vm-only":
            refused = []
            for call in (lambda: backend.share(granter, 1), lambda: backend.unshare(None),
                         lambda: backend.set_share_notify(None, UnmapNotify(0)),
                         lambda: backend.bind_unbound_port(granter),
                         lambda: backend.set_free_per_iteration(1),
                         lambda: backend.set_gntalloc_limit(1)):
                try:
                    call()
                    refused.append("done")
                except OSError as exc:
                    refused.append("EOPNOTSUPP" if exc.errno == errno.EOPNOTSUPP
                                   else errno.errorcode[exc.errno])
                    last = exc.strerror
            say(*refused, "|", last)
        elif command == "events":
            ready, _, _ = select.select([backend.event_fd()], [], [], 0)
            say("events", len(ready), backend.fired_ports(), backend.status())
        elif command == "close":
            backend.close()
            say("ok")
        else:
            say("unknown", command)
    except OSError as exc:
        say("oserror", errno.errorcode.get(exc.errno, exc.errno), exc.strerror)
"""


def pattern(seed: int, size: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(size))



@dataclass
class World:
    """The VM side: hypervisor, domain 1, its sharing half and its port for the host."""

    base: Path
    kernel: KernelDir
    hv: SimHypervisor
    vm: SimBackend
    sharing: SharingHalf
    vm_port: int
    server: HypercallServer

    def pump_until(self, done: Callable[[], bool], what: str,
                   extra: tuple[int, ...] = ()) -> None:
        """Serve hypercalls until ``done()``; ``extra`` fds also wake the wait."""
        serve_until(self.server, done, what, extra)

    def fired(self) -> list[int]:
        """The VM's ports that fired by now (unmasked again), without waiting."""
        ready, _, _ = select.select([self.vm.event_fd()], [], [], 0)
        ports = self.vm.fired_ports() if ready else []
        self.vm.unmask(ports)
        return ports

    def wait_fired(self) -> list[int]:
        """Look at the processes again, as the VM's timer does, until a port fires."""
        got: list[int] = []

        def arrived() -> bool:
            self.hv.refresh()
            got.extend(self.fired())
            return bool(got)

        deadline = time.monotonic() + DEADLINE
        while not arrived():
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the VM's event channel to fire")
            ready, _, _ = select.select([self.server.fileno(), self.vm.event_fd()], [], [],
                                        0.05)
            if self.server.fileno() in ready:
                self.server.on_readable()
        return got

    def host_ports(self) -> list[int]:
        return [port for domid, port in self.hv._ports if domid == HOST]

    def vm_port_connected(self) -> bool:
        return self.hv._ports[(VM, self.vm_port)].remote is not None

    def holds(self) -> int:
        return sum(entry.holds for entry in self.hv._entries.values())


@pytest.fixture
def world() -> Iterator[World]:
    # A short base: the socket path must fit a sockaddr_un.
    top = Path(tempfile.mkdtemp(prefix="gf", dir="/tmp"))
    base = top / "sim"
    kernel = KernelDir.create(base)
    hv = SimHypervisor(kernel.root, clock=Clock())
    vm = SimBackend(hv, VM)
    sharing = SharingHalf(vm, VM, HOST)
    port = sharing.open_channel()
    server = serve_hypercalls(kernel, hv)
    yield World(base, kernel, hv, vm, sharing, port, server)
    server.close()
    vm.close()
    kernel.close()
    shutil.rmtree(top, ignore_errors=True)


class Host(DomainProcess):
    """The host's process (dom0), spoken to a line at a time while the server runs."""

    def __init__(self, world: World, *, by_socket: bool = True, own_domid: int = HOST
                 ) -> None:
        self.world = world
        env = dict(os.environ, QUBESSHM_SIM_ROOT=str(world.base))
        where = str(world.server.path) if by_socket else "-"
        super().__init__(world.server, [sys.executable, "-c", HOST_SCRIPT, str(own_domid),
                                        str(VM), where], "the host", cwd=REPO, env=env)

    def ok(self, *words: object) -> None:
        answer = self.ask(*words)
        assert answer == "ok", (words, answer)

    def bind(self) -> int:
        answer = self.ask("bind", self.world.vm_port).split()
        assert answer[0] == "port", answer
        return int(answer[1])

    def map(self, grant: Grant) -> int:
        answer = self.ask("map", *grant.refs).split()
        assert answer[0] == "mapped", answer
        assert answer[2:] == [str(grant.pages * PAGE_SIZE), "0"]  # size, index 0
        return int(answer[1])

    def end(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        self.proc.wait(timeout=DEADLINE)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def host(world: World) -> Iterator[Host]:
    process = Host(world)
    assert process.greeting == "ready"
    yield process
    process.end()


def armed_pool(world: World, host: Host) -> tuple[Grant, int, int]:
    """The VM shares 3 pages with its notify byte set; the host binds, maps them, arms
    the notify (clear the last byte, signal its port) and writes a pattern through them."""
    grant = world.sharing.share(PAGES * PAGE_SIZE)
    world.sharing.set_notify_byte(grant, LAST)
    port = host.bind()
    assert world.vm_port_connected()
    mapping = host.map(grant)
    host.ok("arm", mapping, LAST, port)
    host.ok("fill", mapping, 7)
    assert grant.area.memory[:LAST] == pattern(7, LAST)
    assert world.holds() == PAGES
    return grant, mapping, port


def still_mapped(world: World, grant: Grant) -> bool:
    world.hv.refresh()
    return world.fired() == [] and not world.sharing.notify_byte_cleared(grant, LAST)


def test_the_notify_fires_once_the_host_unmapped_and_munmapped(world: World,
                                                               host: Host) -> None:
    grant, mapping, _ = armed_pool(world, host)
    host.ok("unmap", mapping)
    assert world.holds() == 0
    assert still_mapped(world, grant)  # the host's own mmap still holds the pages
    host.ok("munmap", mapping)
    assert world.wait_fired() == [world.vm_port]
    assert world.sharing.notify_byte_cleared(grant, LAST)
    assert world.hv._mappings == []
    assert world.sharing.end(grant) is Unshared.ENDED


def test_the_watched_compositor_holds_the_pages_until_it_lets_go(world: World,
                                                                host: Host) -> None:
    grant, mapping, _ = armed_pool(world, host)
    answer = host.ask("compositor", mapping).split()
    assert answer[0] == "compositor", answer
    compositor = int(answer[1])
    assert compositor in world.hv.watched
    host.ok("munmap", mapping)
    host.ok("unmap", mapping)
    assert still_mapped(world, grant)
    host.ok("let-go", compositor)
    assert world.wait_fired() == [world.vm_port]
    assert world.sharing.notify_byte_cleared(grant, LAST)
    assert world.sharing.end(grant) is Unshared.ENDED


def test_the_host_signals_and_an_armed_port_outlives_its_unbind(world: World) -> None:
    host = Host(world, by_socket=False)  # finds the kernel hosting domain 1
    try:
        assert host.greeting == "ready"
        grant, mapping, port = armed_pool(world, host)
        host.ok("notify", port)
        assert world.wait_fired() == [world.vm_port]
        host.ok("unbind", port)
        assert world.host_ports() == [port] and world.vm_port_connected()
        assert host.ask("notify", port).startswith("oserror ENOTCONN")
        host.ok("munmap", mapping)
        host.ok("unmap", mapping)
        assert world.wait_fired() == [world.vm_port]
        assert world.sharing.notify_byte_cleared(grant, LAST)
        assert world.host_ports() == [] and not world.vm_port_connected()
        assert world.sharing.end(grant) is Unshared.ENDED
    finally:
        host.end()


def test_killing_the_host_while_it_maps_fires_the_notify_and_ends_the_grants(
        world: World, host: Host) -> None:
    grant, _, _ = armed_pool(world, host)
    host.proc.send_signal(signal.SIGKILL)
    host.proc.wait(timeout=DEADLINE)
    world.pump_until(lambda: world.server.connections == 0, "the dead host's connection")
    # At the connection's close, with no refresh: the dead process maps nothing.
    assert world.fired() == [world.vm_port]
    assert world.sharing.notify_byte_cleared(grant, LAST)
    assert world.hv._mappings == [] and world.holds() == 0
    assert world.host_ports() == [] and not world.vm_port_connected()
    assert world.hv.watched == frozenset()
    assert world.sharing.end(grant) is Unshared.ENDED
    assert world.hv.counters.deferred_count == 0 and world.hv.counters.live_refs == 0


def test_the_host_only_maps_and_its_close_lets_go_of_everything(world: World,
                                                               host: Host) -> None:
    vm_only = host.ask("vm-only")
    assert vm_only == "EOPNOTSUPP " * 6 + "| tuning the gntalloc limit is the VM side's: " \
        "the host only maps", vm_only
    assert host.ask("events") == "events 0 [] ReclaimStatus(free_per_iteration=None, " \
        "gntalloc_limit=None, deferred_count=None, leaked_count=None, " \
        "deferred_pages_bytes=None)"
    grant = world.sharing.share(PAGE_SIZE)
    assert host.ask("map-mixed", grant.refs[0]).startswith(
        "oserror EINVAL one mapping takes the grants of one domain, not of domains 1, 2")
    grant, mapping, port = armed_pool(world, host)
    spare = host.map(grant)
    host.ok("unmap", spare)
    assert host.ask("unmap", spare) == "oserror EINVAL not a live mapping of this backend"
    assert host.ask("arm", spare, 0, port).startswith("oserror EINVAL")
    assert host.ask("arm", mapping, LAST + 1, port).startswith("oserror EINVAL notify byte")
    # Closing ends the connection; the host's own mmap still holds the pages.
    host.ok("close")
    world.pump_until(lambda: world.server.connections == 0, "the host's connection to close")
    assert world.holds() == 0 and still_mapped(world, grant)
    assert world.host_ports() == [port] and world.vm_port_connected()  # held by the notify
    host.ok("munmap", mapping)
    host.ok("munmap", spare)
    assert world.wait_fired() == [world.vm_port]
    assert world.sharing.notify_byte_cleared(grant, LAST)
    assert world.host_ports() == [] and world.hv._mappings == []
    assert world.sharing.end(grant) is Unshared.ENDED


def test_connecting_fails_in_one_line(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = world.base / "nothing.sock"
    with pytest.raises(ForeignKernelError) as caught:
        connect_sim_host(HOST, VM, missing)
    assert str(caught.value) == (f"cannot reach the simulated hypervisor of domain 1 at "
                                 f"{missing}: No such file or directory")
    monkeypatch.setenv("QUBESSHM_SIM_ROOT", str(world.base))
    with pytest.raises(ForeignKernelError, match=r"^no running simulated kernel under .* "
                       r"hosts domain 7"):
        connect_sim_host(HOST, 7, None)
    monkeypatch.delenv("QUBESSHM_SIM_ROOT")
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(ForeignKernelError) as caught:
        connect_sim_host(HOST, VM, None)
    assert str(caught.value).startswith("cannot look for the simulated kernel hosting "
                                        "domain 1: XDG_RUNTIME_DIR is not set")
    assert "\n" not in str(caught.value)


def test_a_domain_id_the_hypervisor_refuses_is_one_line(world: World) -> None:
    host = Host(world, own_domid=0x7FF0)
    host.end()
    assert host.greeting == (f"refused cannot reach the simulated hypervisor of domain 1 at "
                             f"{world.server.path}: 32752 is not a domain id")
