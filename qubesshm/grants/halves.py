"""Both halves of the grant layer in one process, over the chosen backend.

With the simulated hypervisor the sharing half is domain 1 (the VM) and the
mapping half domain 0 (the GUI domain), two domains of one ``SimHypervisor``,
whose deferred-reclaim timer this object drives. On real Xen one process can
only play both roles in a domain that maps its own grants, so both halves use
the one ``XenBackend`` and grant to ``GUI_DOMID``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .api import GrantBackend
from .mapping import MappingHalf
from .select import open_backend, sim_root
from .sharing import SharingHalf
from .simulated import SimBackend, SimHypervisor

GUI_DOMID = 0
VM_DOMID = 1


@dataclass(eq=False)
class GrantHalves:
    sharing: SharingHalf
    mapping: MappingHalf
    backends: list[GrantBackend]
    hypervisor: SimHypervisor | None = None
    _watched: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return self.backends[0].name

    def watch_compositor(self, pid: int | None) -> None:
        """The simulated hypervisor sees a compositor's mmaps of grants through /proc."""
        if self.hypervisor is not None and pid is not None and pid not in self._watched:
            self._watched.add(pid)
            self.hypervisor.watch(pid)

    def tick(self) -> None:
        """Run the simulated kernel's deferred-reclaim timer when it is due, and fire
        the unmap notifies of mappings the compositor no longer has mmapped."""
        if self.hypervisor is not None:
            self.hypervisor.refresh()
            self.hypervisor.advance()

    def next_tick(self) -> float | None:
        return None if self.hypervisor is None else self.hypervisor.timer_due

    def deferred_pages(self) -> int | None:
        """Pages on the kernel's deferred list for this proxy, None where not visible."""
        return None if self.hypervisor is None else self.hypervisor.deferred_pages

    def leaked_pages(self) -> int | None:
        return None if self.hypervisor is None else self.hypervisor.counters.leaked_count

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def open_halves(choice: str) -> GrantHalves:
    if choice == "xen":
        backend = open_backend("xen")
        return GrantHalves(SharingHalf(backend, GUI_DOMID, GUI_DOMID), MappingHalf(backend),
                           [backend])
    return sim_halves(SimHypervisor(sim_root()))


def sim_halves(hypervisor: SimHypervisor) -> GrantHalves:
    """Both halves on a given simulated hypervisor (tests inject its clock)."""
    vm = SimBackend(hypervisor, VM_DOMID)
    gui = SimBackend(hypervisor, GUI_DOMID)
    return GrantHalves(SharingHalf(vm, VM_DOMID, GUI_DOMID), MappingHalf(gui), [vm, gui],
                       hypervisor)
