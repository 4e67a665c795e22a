"""What a benchmark ran on: CPUs, their model, the load, Weston's version; one line each.

Figures are only comparable with others from the same machine in the same state,
so a benchmark prints these with them: ``describe_machine()`` (CPUs available to
this process, the CPU model, the load average) before it measures and
``load_line()`` after, ``machine_details()`` (CPUs online, cpufreq governor,
virtualisation, cpuidle driver: what decides how fast a sleeping CPU wakes up),
``weston_version()`` when it started Weston, and ``waypipe_version()`` when
waypipe is a baseline. ``CpuTimes`` reads how much CPU the whole machine used, so
that a benchmark can tell what others took while it measured.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

_CPU_DIR = Path("/sys/devices/system/cpu")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown CPU model"


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def parse_cpu_list(text: str) -> set[int]:
    """The CPUs a sysfs list names ("0-3,6" is 0, 1, 2, 3 and 6)."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def online_cpus() -> int:
    """How many CPUs are online (``/sys/devices/system/cpu/online``, else os.cpu_count)."""
    text = _read(_CPU_DIR / "online")
    if text:
        try:
            return len(parse_cpu_list(text))
        except ValueError:
            pass
    return os.cpu_count() or 1


def available_cpus() -> int:
    """How many CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def governor() -> str:
    """The cpufreq governor of the CPUs ("performance", or each one that is in use with
    its CPUs), or "not readable" (a VM without cpufreq, as most are)."""
    found: dict[str, list[str]] = {}
    for path in sorted(_CPU_DIR.glob("cpu[0-9]*/cpufreq/scaling_governor")):
        value = _read(path)
        if value:
            found.setdefault(value, []).append(path.parent.parent.name)
    if not found:
        return "not readable"
    if len(found) == 1:
        return next(iter(found))
    return ", ".join(f"{name} ({' '.join(cpus)})" for name, cpus in found.items())


def virtualisation() -> str:
    """Whether this is a virtual machine, as far as cheaply known: the CPU's
    ``hypervisor`` flag, the DMI vendor and product, Xen's /sys/hypervisor."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = value
                break
    except OSError:
        pass
    vendor = " ".join(v for v in (_read(Path("/sys/class/dmi/id/sys_vendor")),
                                  _read(Path("/sys/class/dmi/id/product_name"))) if v)
    xen = _read(Path("/sys/hypervisor/type"))
    said = [f"DMI: {vendor}"] if vendor else []
    if xen:
        said.append(f"/sys/hypervisor/type: {xen}")
    if "hypervisor" in flags.split():
        return "virtual machine (the CPU's hypervisor flag" + "".join(
            f"; {s}" for s in said) + ")"
    if xen:
        return f"virtual machine ({said[-1]})"
    return "no hypervisor flag" + (f" ({said[0]})" if said else "") + ": bare metal?"


def cpuidle() -> str:
    """The cpuidle driver and governor ("haltpoll/haltpoll" in a KVM guest that polls
    before it halts), or "not readable"."""
    driver = _read(_CPU_DIR / "cpuidle" / "current_driver")
    gov = (_read(_CPU_DIR / "cpuidle" / "current_governor")
           or _read(_CPU_DIR / "cpuidle" / "current_governor_ro"))
    if not driver and not gov:
        return "not readable"
    text = f"driver {driver or 'none'}, governor {gov or 'none'}"
    poll = _read(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns"))
    if driver == "haltpoll" and poll is not None:
        text += f", guest_halt_poll_ns {poll}"
    return text


def machine_details() -> str:
    """One line: the CPUs this process may use and those online, the cpufreq governor,
    virtualisation and the cpuidle driver."""
    return (f"CPUs: {available_cpus()} available to this process, {online_cpus()} online; "
            f"cpufreq governor: {governor()}; {virtualisation()}; cpuidle: {cpuidle()}")


@dataclass(frozen=True)
class CpuTimes:
    """CPU time so far from ``/proc/stat``, in seconds: busy (user, nice, system, irq,
    softirq) and stolen by the hypervisor; of the whole machine or of some CPUs."""

    busy: float
    steal: float

    @classmethod
    def now(cls, cpus: Collection[int] | None = None) -> CpuTimes:
        """So far, on ``cpus`` (all of them unless given)."""
        wanted = {"cpu"} if cpus is None else {f"cpu{cpu}" for cpu in cpus}
        busy = steal = 0
        try:
            lines = Path("/proc/stat").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            name, *fields = line.split()
            if name not in wanted:
                continue
            ticks = [int(v) for v in fields] + [0] * 8
            user, nice, system, _idle, _iowait, irq, softirq, stolen = ticks[:8]
            busy += user + nice + system + irq + softirq
            steal += stolen
        hz = os.sysconf("SC_CLK_TCK")
        return cls(busy / hz, steal / hz)


def load_average() -> float:
    """The one-minute load average."""
    return os.getloadavg()[0]


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def describe_machine() -> str:
    cpus = len(os.sched_getaffinity(0))
    return f"machine: {cpus} CPUs ({cpu_model()}), {load_line()} before the run"


def _version(program: str) -> str | None:
    """The first line of ``program --version``, or None."""
    path = shutil.which(program)
    if path is None:
        return None
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None


def weston_version() -> str | None:
    """``weston --version``'s answer ("weston 10.0.1"), or None."""
    return _version("weston")


def waypipe_version() -> str | None:
    """``waypipe --version``'s first line ("waypipe 0.8.4"), or None."""
    return _version("waypipe")


def versions_line(started_weston: bool) -> str:
    """Python's version, and Weston's (when the benchmark started it) and waypipe's."""
    parts = [f"Python {platform.python_version()}"]
    if started_weston:
        parts.append(weston_version() or "weston version unknown")
    parts.append(waypipe_version() or "waypipe not installed")
    return "versions: " + ", ".join(parts)
