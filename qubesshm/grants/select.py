"""Choosing the grant backend: ``--grants sim|xen|auto`` or ``QUBESSHM_GRANTS``.

``auto`` means real Xen when ``/dev/xen/gntalloc`` exists, else the simulated
hypervisor, whose parameter files live under ``QUBESSHM_SIM_ROOT`` (default
``$XDG_RUNTIME_DIR/qubesshm-sim``) so that ``qubesshm tune`` in another process
sees and changes what a running proxy uses.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import GrantBackend, ReclaimStatus
from .files import UnsafeDirectory, check_private_dir
from .params import DEFAULT_FREE_PER_ITERATION, DEFAULT_GNTALLOC_LIMIT, ModuleParams

CHOICES = ("sim", "xen", "auto")
XEN_DEVICE_DIR = Path("/dev/xen")
# The simulated hypervisor's own domain, and the GUI domain it grants to.
SIM_DOMID = 1


class GrantsChoiceError(ValueError):
    """An unknown backend name."""


def choose(requested: str | None, device_dir: Path = XEN_DEVICE_DIR) -> str:
    """``sim`` or ``xen``, from the option, else the environment, else ``auto``."""
    choice = requested or os.environ.get("QUBESSHM_GRANTS") or "auto"
    if choice not in CHOICES:
        raise GrantsChoiceError(f"unknown grant backend {choice!r}: choose one of "
                                f"{', '.join(CHOICES)} (--grants or QUBESSHM_GRANTS)")
    if choice == "auto":
        return "xen" if (device_dir / "gntalloc").exists() else "sim"
    return choice


def sim_root() -> Path:
    """Where the simulated kernel's files live; never a predictable shared path.

    ``QUBESSHM_SIM_ROOT`` if set, else ``$XDG_RUNTIME_DIR/qubesshm-sim``, where the
    runtime directory must be the user's own, mode 0700, as libwayland requires.
    """
    explicit = os.environ.get("QUBESSHM_SIM_ROOT")
    if explicit:
        return Path(explicit)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        raise UnsafeDirectory("XDG_RUNTIME_DIR is not set, so the simulated kernel has no "
                              "private place for its files: set it (a directory of yours, "
                              "mode 0700) or QUBESSHM_SIM_ROOT")
    check_private_dir(Path(runtime), "XDG_RUNTIME_DIR")
    return Path(runtime) / "qubesshm-sim"


def open_backend(choice: str) -> GrantBackend:
    """A backend for this process's domain."""
    if choice == "xen":
        from .xen import XenBackend

        return XenBackend()
    from .simulated import SimBackend, SimHypervisor

    return SimBackend(SimHypervisor(sim_root()), SIM_DOMID)


def params_for(choice: str) -> ModuleParams:
    if choice == "xen":
        return ModuleParams(Path("/"))
    return ModuleParams(sim_root())


def reclaim_status(choice: str) -> ReclaimStatus:
    """What ``tune`` shows, read without opening any device."""
    params = params_for(choice)
    if choice == "sim" and not params.root.exists():
        # A simulated kernel that never booted has Linux's defaults; showing them
        # creates nothing.
        return ReclaimStatus(DEFAULT_FREE_PER_ITERATION, DEFAULT_GNTALLOC_LIMIT, None, None)
    counters = None
    if choice == "sim":
        from .simulated import read_published_counters

        counters = read_published_counters(params.root)

    def read(getter: str) -> int | None:
        try:
            value: int = getattr(params, getter)
        except (FileNotFoundError, PermissionError):
            # An older kernel, the module not loaded, or a file only root may read.
            return None
        return value

    return ReclaimStatus(
        free_per_iteration=read("free_per_iteration"),
        gntalloc_limit=read("gntalloc_limit"),
        deferred_count=None if counters is None else counters.get("deferred_count"),
        leaked_count=None if counters is None else counters.get("leaked_count"),
        deferred_pages_bytes=None if counters is None else counters.get("deferred_pages_bytes"),
    )
