"""Both halves of the grant layer in one process, over the chosen backend.

With the simulated hypervisor the sharing half is domain 1 (the VM) and the
mapping half domain 0 (the GUI domain), two domains of one ``SimHypervisor``,
whose deferred-reclaim timer this object drives; it boots with the parameters
asked for in a directory of its own (``simkernels``), removed when it closes.
On real Xen one process can only play both roles in a domain that maps its own
grants, so both halves use the one ``XenBackend`` and grant to ``GUI_DOMID``.

A split proxy's VM side (``open_vm_half``) has only the sharing half here: its
mapping half is the host, in another domain (``remote.RemoteMappingHalf`` stands
in for it). Simulated, this process boots the kernel as domain ``VM_DOMID`` and
serves its hypercalls, through which the host (domain 0, another process) maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .api import GrantBackend
from .hypercalls import HypercallServer, serve_hypercalls
from .mapping import MappingHalf
from .params import DEFAULT_KERNEL, Kernel
from .sharing import SharingHalf
from .simkernels import KernelDir
from .simulated import SimBackend, SimHypervisor

GUI_DOMID = 0
VM_DOMID = 1


@dataclass(eq=False)
class GrantHalves:
    sharing: SharingHalf
    mapping: MappingHalf
    backends: list[GrantBackend]
    hypervisor: SimHypervisor | None = None
    # The simulated kernel's directory, when this process booted it.
    kernel_dir: KernelDir | None = None
    # The simulated kernel's hypercalls, served to a host half in another process.
    hypercalls: HypercallServer | None = None
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
        if self.hypercalls is not None:
            self.hypercalls.close()
        for backend in self.backends:
            backend.close()
        self.mapping.close()
        if self.kernel_dir is not None:
            self.kernel_dir.close()


def open_halves(choice: str, kernel: Kernel = DEFAULT_KERNEL) -> GrantHalves:
    """Real Xen's halves (its parameters are the machine's), or a simulated kernel of
    this process's own, booted with ``kernel``'s parameters."""
    if choice == "xen":
        from .xen import XenBackend

        backend = XenBackend()
        return GrantHalves(SharingHalf(backend, GUI_DOMID, GUI_DOMID), MappingHalf(backend),
                           [backend])
    directory = KernelDir.create()
    try:
        halves = sim_halves(SimHypervisor(directory.root, kernel=kernel))
    except BaseException:
        directory.close()
        raise
    halves.kernel_dir = directory
    return halves


def sim_halves(hypervisor: SimHypervisor) -> GrantHalves:
    """Both halves on a given simulated hypervisor (tests inject its clock)."""
    vm = SimBackend(hypervisor, VM_DOMID)
    gui = SimBackend(hypervisor, GUI_DOMID)
    return GrantHalves(SharingHalf(vm, VM_DOMID, GUI_DOMID), MappingHalf(gui), [vm, gui],
                       hypervisor)


def open_vm_half(choice: str, domid: int, kernel: Kernel = DEFAULT_KERNEL) -> GrantHalves:
    """A split proxy's VM side: the sharing half of domain ``domid`` (it grants to the
    host's domain, set once the host has said it: ``sharing.peer_domid``), with a
    ``RemoteMappingHalf``. Simulated: a kernel of this process's own hosting
    ``domid``, serving hypercalls (started with ``hypercalls.start(loop)``)."""
    from .remote import RemoteMappingHalf

    if choice == "xen":
        from .xen import XenBackend

        backend = XenBackend()
        return GrantHalves(SharingHalf(backend, domid, GUI_DOMID), RemoteMappingHalf(),
                           [backend])
    directory = KernelDir.create()
    try:
        hypervisor = SimHypervisor(directory.root, kernel=kernel)
        vm = SimBackend(hypervisor, domid)
        server = serve_hypercalls(directory, hypervisor, domains=[domid])
    except BaseException:
        directory.close()
        raise
    return GrantHalves(SharingHalf(vm, domid, GUI_DOMID), RemoteMappingHalf(), [vm],
                       hypervisor, directory, server)
