"""What a benchmark ran on: CPUs, their model, the load, Weston's version; one line each.

Figures are only comparable with others from the same machine in the same state,
so a benchmark prints these with them: ``describe_machine()`` (CPUs available to
this process, the CPU model, the load average) before it measures and
``load_line()`` after, ``weston_version()`` when it started Weston, and
``waypipe_version()`` when waypipe is a baseline.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown CPU model"


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
