"""Choosing the grant backend: ``--grants sim|xen|auto`` or ``QUBESSHM_GRANTS``.

``auto`` means real Xen when ``/dev/xen/gntalloc`` exists, else the simulated
hypervisor (each command boots one of its own: ``simkernels``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import ReclaimStatus
from .params import ModuleParams

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


def xen_status() -> ReclaimStatus:
    """What ``tune`` shows of real Xen, read without opening any device."""
    params = ModuleParams(Path("/"))

    def read(getter: str) -> int | None:
        try:
            value: int = getattr(params, getter)
        except (FileNotFoundError, PermissionError):
            # An older kernel, the module not loaded, or a file only root may read.
            return None
        return value

    return ReclaimStatus(free_per_iteration=read("free_per_iteration"),
                         gntalloc_limit=read("gntalloc_limit"),
                         deferred_count=None, leaked_count=None)
