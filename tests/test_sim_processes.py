"""The simulated hypervisor watching a real foreign process map and unmap granted pages."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernels import Clock

from qubesshm.grants.api import PAGE_SIZE, UnmapNotify, Unshared
from qubesshm.grants.simulated import SimBackend, SimHypervisor

VM, GUI = 1, 0

# Stands in for a compositor: mmaps the fd it was given, says what it sees, and
# munmaps or exits when told.
MAPPER = """
import mmap, sys
fd = int(sys.argv[1])
pages = mmap.mmap(fd, int(sys.argv[2]))
print(pages[:8].hex(), flush=True)
command = sys.stdin.readline().strip()
if command == "munmap":
    pages.close()
    print("unmapped", flush=True)
    sys.stdin.readline()
"""



@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[SimHypervisor, SimBackend, SimBackend, Clock]]:
    clock = Clock(0.0)
    hv = SimHypervisor(tmp_path, clock=clock)
    vm, gui = SimBackend(hv, VM), SimBackend(hv, GUI)
    yield hv, vm, gui, clock
    gui.close()
    vm.close()


def start_mapper(fd: int, size: int) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", MAPPER, str(fd), str(size)],
                             pass_fds=[fd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    return child


def test_foreign_process_mapping_blocks_end_and_fires_notifies(world: tuple[
        SimHypervisor, SimBackend, SimBackend, Clock]) -> None:
    hv, vm, gui, _ = world
    vm_port = vm.bind_unbound_port(GUI)
    gui_port = gui.bind_interdomain(VM, vm_port)
    area = vm.share(GUI, 3)
    area.memory[:8] = b"granted!"
    area.memory[100] = 0xAB
    mapped = gui.map([(VM, ref) for ref in area.refs])
    gui.set_map_notify(mapped, UnmapNotify(clear_byte=100, event_port=gui_port))

    child = start_mapper(mapped.fd, mapped.size)
    assert child.stdin is not None and child.stdout is not None
    # The real process sees the granted memory.
    assert child.stdout.readline().strip() == b"granted!".hex()
    hv.watch(child.pid)

    # The mapping side lets go, but the process still maps the pages: no notify.
    gui.unmap(mapped)
    hv.refresh()
    assert area.memory[100] == 0xAB
    assert vm.fired_ports() == []

    child.stdin.write("munmap\n")
    child.stdin.flush()
    assert child.stdout.readline() == "unmapped\n"
    hv.refresh()
    # Its last mapping gone: the byte is cleared and the event reaches the VM.
    assert area.memory[100] == 0
    assert vm.fired_ports() == [vm_port]
    assert vm.unshare(area) is Unshared.ENDED
    child.stdin.write("exit\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == 0
    assert hv.counters.live_refs == 0 and hv.counters.open_memfds == 0


def test_grant_ends_only_after_the_process_exits(world: tuple[
        SimHypervisor, SimBackend, SimBackend, Clock]) -> None:
    hv, vm, gui, clock = world
    vm_port = vm.bind_unbound_port(GUI)
    gui_port = gui.bind_interdomain(VM, vm_port)
    area = vm.share(GUI, 2)
    area.memory[7] = 0x55
    mapped = gui.map([(VM, ref) for ref in area.refs])
    gui.set_map_notify(mapped, UnmapNotify(clear_byte=7, event_port=gui_port))
    child = start_mapper(mapped.fd, mapped.size)
    assert child.stdin is not None and child.stdout is not None
    child.stdout.readline()
    hv.watch(child.pid)
    gui.unmap(mapped)

    # Ending fails while the process maps the pages: the grants are deferred.
    assert vm.unshare(area) is Unshared.DEFERRED
    assert hv.counters.deferred_count == 2
    clock.now += 1.0
    assert hv.advance() == 1
    assert hv.counters.deferred_count == 2  # retried, still mapped, re-queued
    hv.refresh()
    assert vm.fired_ports() == []

    child.stdin.close()  # the process exits, and its mappings with it
    assert child.wait(timeout=30) == 0
    hv.refresh()
    # The exit was the last mapping: the notify fires (the deferred pages still
    # exist, so the cleared byte is real), and the next tick ends the grants.
    assert vm.fired_ports() == [vm_port]
    deferred_pages = hv._entries[area.refs[0]].pages
    assert os.pread(deferred_pages.fd, 1, 7) == b"\0"
    clock.now += 1.0
    assert hv.advance() == 1
    assert hv.counters.deferred_count == 0
    assert hv.counters.history == [0, 2]
    assert hv.timer_due is None
    assert hv.counters.open_memfds == 0


def test_mapping_fd_is_mmappable_at_offset_zero_in_another_process(world: tuple[
        SimHypervisor, SimBackend, SimBackend, Clock]) -> None:
    hv, vm, gui, _ = world
    first = vm.share(GUI, 1)
    second = vm.share(GUI, 2)
    second.memory[:8] = b"second!!"
    second.memory[PAGE_SIZE:PAGE_SIZE + 8] = b"page two"
    mapped = gui.map([(VM, ref) for ref in second.refs])
    child = start_mapper(mapped.fd, mapped.size)
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == b"second!!".hex()
    child.stdin.close()
    assert child.wait(timeout=30) == 0, "the mapping process failed"
    gui.unmap(mapped)
    vm.unshare(first)
    vm.unshare(second)
    assert hv.counters.live_refs == 0
