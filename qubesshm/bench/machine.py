"""What a benchmark ran on: CPUs, their model, the load, Weston's version; one line each.

Figures are only comparable with others from the same machine in the same state,
so a benchmark prints these with them: ``describe_machine()`` (CPUs available to
this process, the CPU model, the load average) before it measures and
``load_line()`` after, and ``weston_version()`` when it started Weston.
"""

from __future__ import annotations

import os
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


def weston_version() -> str | None:
    """``weston --version``'s answer ("weston 10.0.1"), or None."""
    weston = shutil.which("weston")
    if weston is None:
        return None
    try:
        result = subprocess.run([weston, "--version"], capture_output=True, text=True,
                                timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else None
