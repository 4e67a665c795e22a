"""``qubesshm tune``: show or set the grant reclaim parameters of a kernel.

On real Xen the kernel is the machine's (``/sys/module/...``). On the simulated
grant layer each running ``serve`` or ``run`` has a kernel of its own
(``grants.simkernels``); tune acts on the one running, or on the one serving
``--socket NAME`` when several run. With none running there is nothing to set:
it shows the parameters a new simulated kernel boots with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .grants.api import ReclaimStatus
from .grants.params import DEFAULT_KERNEL, FREE_PER_ITERATION, GNTALLOC_LIMIT, ModuleParams
from .grants.select import XEN_DEVICE_DIR, choose, xen_status
from .grants.simkernels import RunningKernel, running_kernels, sim_base
from .grants.simulated import read_published_counters
from .relay.listener import runtime_path


class TuneError(Exception):
    """One line for the user: nothing was changed."""


def run_tune(args: argparse.Namespace) -> int:
    try:
        return _tune(args)
    except TuneError as exc:
        print(f"qubesshm tune: {exc}", file=sys.stderr)
        return 1


def _tune(args: argparse.Namespace) -> int:
    setting = args.free_per_iteration is not None or args.gntalloc_limit is not None
    choice = choose(args.grants)
    if choice == "xen":
        if not (XEN_DEVICE_DIR / "gntalloc").exists():
            raise TuneError(f"{XEN_DEVICE_DIR / 'gntalloc'} does not exist: this is not a Xen "
                            "domain; use --grants sim or QUBESSHM_GRANTS=sim for the "
                            "simulated hypervisor")
        if args.socket is not None:
            raise TuneError("--socket picks one of several simulated kernels; real Xen has "
                            "one kernel, the machine's")
        _set(ModuleParams(Path("/")), args)
        _show("grants: xen (real Xen)", xen_status(), real=True)
        return 0
    base = sim_base()
    kernel = _pick(running_kernels(base), args.socket, base)
    if kernel is None:
        if setting:
            raise TuneError(f"no simulated kernel is running (under {base}), so there is "
                            "nothing to tune: each qubesshm serve or run boots its own, with "
                            "a Qubes VM's parameters (--kernel stock for Linux's); set the "
                            "gntalloc limit at start with --gntalloc-limit, or tune one while "
                            "it runs")
        print(f"grants: sim (no simulated kernel is running under {base}; a new one boots "
              "with a Qubes VM's parameters, these:)")
        _show("", ReclaimStatus(DEFAULT_KERNEL.free_per_iteration, DEFAULT_KERNEL.gntalloc_limit,
                                None, None), real=False)
        return 0
    params = ModuleParams(kernel.root)
    _set(params, args)
    serving = f", serving {kernel.socket}" if kernel.socket else ""
    counters = read_published_counters(kernel.root) or {}

    def read(getter: str) -> int | None:
        try:
            value: int = getattr(params, getter)
        except OSError:
            return None  # a file removed (as before Linux 6.5)
        return value

    status = ReclaimStatus(read("free_per_iteration"), read("gntalloc_limit"),
                           counters.get("deferred_count"), counters.get("leaked_count"),
                           counters.get("deferred_pages_bytes"))
    _show(f"grants: sim (the simulated kernel of process {kernel.pid}{serving}; files under "
          f"{kernel.root})", status, real=False, params=params)
    return 0


def _pick(kernels: list[RunningKernel], socket: str | None,
          base: Path) -> RunningKernel | None:
    if socket is not None:
        wanted = str(runtime_path(socket))
        for kernel in kernels:
            if kernel.socket == wanted:
                return kernel
        raise TuneError(f"no simulated kernel under {base} serves {wanted}"
                        + (f" (running: {_listing(kernels)})" if kernels else ""))
    if len(kernels) > 1:
        raise TuneError(f"{len(kernels)} simulated kernels are running ({_listing(kernels)}): "
                        "pick one with --socket NAME")
    return kernels[0] if kernels else None


def _listing(kernels: list[RunningKernel]) -> str:
    return "; ".join(f"process {k.pid}" + (f" serving {k.socket}" if k.socket else "")
                     for k in kernels)


def _set(params: ModuleParams, args: argparse.Namespace) -> None:
    try:
        if args.free_per_iteration is not None:
            params.free_per_iteration = args.free_per_iteration
        if args.gntalloc_limit is not None:
            params.gntalloc_limit = args.gntalloc_limit
    except OSError as exc:
        raise TuneError(exc.strerror or str(exc)) from exc


def _show(heading: str, status: ReclaimStatus, *, real: bool,
          params: ModuleParams | None = None) -> None:
    if heading:
        print(heading)
    where = params or ModuleParams(Path("/"))

    def show(label: str, value: int | None, missing: str) -> None:
        print(f"{label:<22}{value if value is not None else missing}")

    show("free_per_iteration", status.free_per_iteration,
         f"not available ({where.path(FREE_PER_ITERATION)} missing: Linux < 6.5?)")
    show("gntalloc limit", status.gntalloc_limit,
         f"not available ({where.path(GNTALLOC_LIMIT)} missing: xen_gntalloc not loaded?)")
    hidden = "not exposed by the kernel" if real else "none yet"
    show("deferred_count", status.deferred_count, hidden)
    show("leaked_count", status.leaked_count, hidden)
    if status.deferred_pages_bytes is not None:
        show("deferred bytes", status.deferred_pages_bytes, hidden)
