"""The agent's grant side: this VM sharing window areas with the GUI domain.

In agent mode the VM only shares (gntalloc); the GUI domain maps in another
process, or on real Xen in another domain. Off Xen the agent boots a simulated
kernel of its own (``grants.simkernels``) hosting domain ``domid``, and serves
hypercalls beside it (``grants.hypercalls``), through which the GUI-daemon
emulator maps dumps as domain ``gui_domid``: the simulated kernel sees those
mappings, and ending a grant still mapped defers, as on Xen.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..grants.api import GrantBackend
from ..grants.hypercalls import HypercallServer, serve_hypercalls
from ..grants.params import Kernel
from ..grants.sharing import SharingHalf
from ..grants.simkernels import KernelDir
from ..grants.simulated import SimBackend, SimHypervisor

REFRESH_INTERVAL = 1.0  # seconds between the simulated kernel's looks at processes


@dataclass(eq=False)
class AgentGrants:
    """The sharing half of domain ``domid`` towards ``gui_domid``."""

    sharing: SharingHalf
    backend: GrantBackend
    domid: int
    gui_domid: int
    hypervisor: SimHypervisor | None = None
    kernel_dir: KernelDir | None = None
    hypercalls: HypercallServer | None = None
    _closed: bool = field(default=False)
    _refreshed: float = field(default=-1e9)

    @property
    def name(self) -> str:
        return self.backend.name

    def describe(self) -> str:
        if self.hypervisor is None:
            return f"{self.backend.name} (gntalloc to domain {self.gui_domid})"
        status = self.hypervisor.status()
        return (f"{self.backend.name}, a simulated kernel of its own (gntalloc limit "
                f"{status.gntalloc_limit} pages, free_per_iteration "
                f"{status.free_per_iteration}); the GUI domain maps through "
                f"{self.hypercalls.path if self.hypercalls is not None else 'nothing'}")

    def tick(self) -> None:
        """Run the simulated kernel's deferred-reclaim timer when due, and, once a
        second, look at the processes whose mappings it watches (to drop the watch of
        one that maps no grant any more: an X server the emulator handed pages to).
        Agent mode sets no unmap notify, so nothing else waits on that look, which
        reads each process's whole memory map."""
        if self.hypervisor is not None:
            now = self.hypervisor.clock()
            if now - self._refreshed >= REFRESH_INTERVAL:
                self._refreshed = now
                self.hypervisor.refresh()
            self.hypervisor.advance()

    def next_tick(self) -> float | None:
        return None if self.hypervisor is None else self.hypervisor.timer_due

    def deferred_pages(self) -> int | None:
        return None if self.hypervisor is None else self.hypervisor.deferred_pages

    def leaked_pages(self) -> int | None:
        return None if self.hypervisor is None else self.hypervisor.counters.leaked_count

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.hypercalls is not None:
            self.hypercalls.start(loop)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.hypercalls is not None:
            self.hypercalls.close()
        self.backend.close()
        if self.kernel_dir is not None:
            self.kernel_dir.close()


def open_agent_grants(choice: str, domid: int, gui_domid: int, kernel: Kernel) -> AgentGrants:
    """Real Xen's gntalloc (``choice`` "xen"), or a simulated kernel of this process
    booted with ``kernel``'s parameters, hosting ``domid`` and serving hypercalls."""
    if choice == "xen":
        from ..grants.xen import XenBackend

        backend: GrantBackend = XenBackend()
        return AgentGrants(SharingHalf(backend, domid, gui_domid), backend, domid, gui_domid)
    directory = KernelDir.create()
    try:
        hypervisor = SimHypervisor(directory.root, kernel=kernel)
        sim = SimBackend(hypervisor, domid)
        server = serve_hypercalls(directory, hypervisor, domains=[domid])
    except BaseException:
        directory.close()
        raise
    return AgentGrants(SharingHalf(sim, domid, gui_domid), sim, domid, gui_domid,
                       hypervisor, directory, server)
