"""What the benchmarks start: the compositor, ``qubesshm serve``, waypipe; and their CPU.

Every path a benchmark compares runs over the same compositor in the same run:
the user's (``--upstream``, or a running one), else a private headless Weston.
``start_split`` runs the split proxy (``serve --remote`` starting ``qubesshm
host``), and both it and waypipe can have their stream go through a byte-counting
``meter``. ``cpu_seconds`` adds up the scheduler's run time of the relaying
processes and of their children (waypipe forks one per connection; serve starts
the host half), leaving out a meter's own.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..grants.mapping import peer_pid
from ..headless import HeadlessWeston, compositor_is_running
from ..relay.listener import upstream_path
from .meter import read_counters

# The gntalloc limit Qubes sets in VMs; Linux's default of 1024 pages is less than
# one 1920x1080 buffer.
QUBES_GNTALLOC_LIMIT = 2**30


def last_line(log: Path | None) -> str:
    """The last line a process wrote to ``log`` (its error, when it failed), or ""."""
    if log is None:
        return ""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines()]
    except OSError:
        return ""
    return next((line for line in reversed(lines) if line), "")


def unusual_lines(log: Path, most: int = 5) -> list[str]:
    """Up to ``most`` lines of ``log`` that warn or tell of an error or a kill (what a
    process said besides its usual start and summary lines)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    words = ("warning", "error", "traceback", "killed", "exception", "failed", "refused")
    found = [line.strip() for line in lines
             if any(word in line.lower() for word in words)
             and not line.startswith("qubesshm: summary:")]
    return found[:most]


def report_log(what: str, log: Path) -> None:
    """Print what ``unusual_lines`` finds in ``log``, or that there was nothing."""
    found = unusual_lines(log)
    if not found:
        print(f"{what}: no warnings or errors in its log")
        return
    print(f"{what}: its log has warnings or errors; the first {len(found)}:")
    for line in found:
        print(f"  {line}")


def exited(what: str, proc: subprocess.Popen[bytes], log: Path | None = None) -> str:
    """"WHAT exited with status N", and what it said last when it wrote to ``log``."""
    said = last_line(log)
    return f"{what} exited with status {proc.returncode}" + (f": {said}" if said else "")


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], what: str,
                    log: Path | None = None) -> None:
    deadline = time.monotonic() + 20
    while not compositor_is_running(str(path)):
        if proc.poll() is not None:
            raise RuntimeError(exited(what, proc, log))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not open {path}")
        time.sleep(0.05)


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str],
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``args`` running until the block ends (SIGTERM, then SIGKILL after 10 s); its
    output to ``log`` (created or appended to), else dropped."""
    # A process group of its own, so that what it starts (waypipe server's command)
    # ends with it.
    with contextlib.ExitStack() as files:
        out: int | IO[bytes] = (subprocess.DEVNULL if log is None
                                else files.enter_context(open(log, "ab")))
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT if log is not None else out,
                                process_group=0)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def compositor(upstream: str | None, *, width: int = 1024, height: int = 640,
               animations: bool = True) -> Iterator[Path]:
    """The compositor a benchmark measures: the one given with ``--upstream``, else a
    headless Weston of its own (never whatever ``$WAYLAND_DISPLAY`` happens to name,
    so that a figure says which compositor it is of). Prints which."""
    if upstream is not None:
        path = upstream_path(upstream)
        if not compositor_is_running(str(path)):
            raise RuntimeError(f"no compositor answers at {path}")
        print(f"compositor: {path} (given with --upstream, configured as it was started)")
        yield path
        return
    with HeadlessWeston(debug=False, width=width, height=height,
                        animations=animations) as weston:
        print(f"compositor: {weston.describe()}")
        yield weston.socket_path


def start_qubesshm(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                   upstream: Path, *extra: str) -> tuple[Path, int]:
    """``qubesshm serve`` in ``workdir``; its socket and pid."""
    socket_path = workdir / "qubesshm-bench"
    proc = stack.enter_context(process(
        [sys.executable, "-m", "qubesshm", "serve", "--socket", str(socket_path),
         "--upstream", str(upstream), *extra], env))
    wait_for_socket(socket_path, proc, "qubesshm serve")
    return socket_path, proc.pid


@dataclass
class Meter:
    """A byte-counting pass-through (``qubesshm.bench.meter``) on a path's stream,
    known by its counters file."""

    counters: Path

    def pid(self) -> int:
        return read_counters(self.counters)[0]

    def bytes(self) -> int:
        """Bytes delivered so far, both ways."""
        _, forward, back = read_counters(self.counters)
        return forward + back


def meter_command(counters: Path, *tail: str) -> list[str]:
    return [sys.executable, "-m", "qubesshm.bench.meter", "--counters", str(counters), *tail]


def split_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a split proxy here: the simulated grant layer of its own (the host
    half reaches its hypervisor through serve)."""
    out = dict(env, QUBESSHM_GRANTS="sim")
    out.pop("QUBESSHM_SIM_ROOT", None)
    return out


def host_command(upstream: Path, meter: Meter | None = None, extra: Sequence[str] = ()) -> str:
    """``--remote``'s command: ``qubesshm host`` for ``upstream`` with ``extra``, through
    ``meter`` when given."""
    host = [sys.executable, "-m", "qubesshm", "host", "--grants", "sim", "--upstream",
            str(upstream), *extra]
    if meter is not None:
        host = meter_command(meter.counters, "--", *host)
    return shlex.join(host)


def start_split(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                upstream: Path, *extra: str, meter: Meter | None = None,
                host_extra: Sequence[str] = (), log: Path | None = None) -> tuple[Path, int]:
    """A split proxy in ``workdir``: ``qubesshm serve --remote`` (with ``extra``) starting
    ``qubesshm host`` for ``upstream`` (with ``host_extra``; through ``meter`` when
    given); its socket and serve's pid (the host half and the meter are its children)."""
    socket_path = workdir / "qubesshm-split"
    proc = stack.enter_context(process(
        [sys.executable, "-m", "qubesshm", "serve", "--grants", "sim", "--socket",
         str(socket_path), "--remote", host_command(upstream, meter, host_extra), *extra],
        split_env(env), log))
    wait_for_socket(socket_path, proc, "qubesshm serve --remote", log)
    return socket_path, proc.pid


def start_waypipe(stack: contextlib.ExitStack, env: dict[str, str], workdir: Path,
                  upstream: Path, skip: bool,
                  meter: Meter | None = None) -> tuple[Path, list[int]] | None:
    """waypipe client + server on this machine, no compression: its display and pids.
    With ``meter`` the server connects to the meter, which joins each of its
    connections to the client's socket."""
    waypipe = shutil.which("waypipe")
    if skip:
        print("waypipe: skipped (--no-waypipe)")
        return None
    if waypipe is None:
        print("waypipe: not installed (Debian package 'waypipe'); baseline skipped")
        return None
    link = workdir / "waypipe.sock"
    display = workdir / "waypipe-display"
    wp_env = dict(env, WAYLAND_DISPLAY=str(upstream))
    wp_client = stack.enter_context(process(
        [waypipe, "--compress", "none", "--no-gpu", "--socket", str(link), "client"], wp_env))
    deadline = time.monotonic() + 20
    while not link.exists() and wp_client.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    server_link = link
    if meter is not None:
        server_link = workdir / "waypipe-metered.sock"
        metering = stack.enter_context(process(meter_command(
            meter.counters, "--listen", str(server_link), "--connect", str(link)), env))
        while (not server_link.exists() and metering.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
    wp_server = stack.enter_context(process(
        [waypipe, "--compress", "none", "--no-gpu", "--socket", str(server_link),
         "--display", str(display), "server", "--", "sleep", "86400"], env))
    try:
        wait_for_socket(display, wp_server, "waypipe server")
    except RuntimeError as exc:
        print(f"waypipe: {exc}; baseline skipped (run waypipe by hand to see why)")
        return None
    return display, [wp_client.pid, wp_server.pid]


def listener_pid(path: Path) -> int | None:
    """The process listening on the Unix socket ``path`` (``SO_PEERCRED`` of a connection
    made and closed at once: a compositor sees a client come and go), None if none
    answers or it cannot be told (another pid namespace)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return None
        return peer_pid(sock)


def own_cpu_seconds(pid: int) -> float:
    """CPU time so far of ``pid``'s own threads (not its children's), as ``cpu_seconds``
    reads it; 0 once it has gone."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # the thread ended meanwhile
            continue
    return total / 1e9


def _pids() -> list[str]:
    """Every process's directory name in /proc (some may be gone by the time they are
    read: each read skips one that is)."""
    with os.scandir("/proc") as procs:
        return [entry.name for entry in procs if entry.name.isdigit()]


def _parent(stat: str) -> int:
    """The parent pid in a ``/proc/.../stat`` line (after the command's parenthesis)."""
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """``pid``'s children, theirs, and so on, from /proc."""
    children: dict[int, list[int]] = {}
    for name in _pids():
        try:
            parent = _parent(Path(f"/proc/{name}/stat").read_text())
        except (OSError, ValueError, IndexError):  # it ended meanwhile
            continue
        children.setdefault(parent, []).append(int(name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def cpu_seconds(pids: list[int], exclude: Collection[int] = ()) -> float:
    """CPU time so far of ``pids`` and all their descendants, from the scheduler's
    nanosecond run-time (``/proc/<pid>/task/<tid>/schedstat``): the user+system
    clock ticks of ``/proc/<pid>/stat`` are 10 ms, coarser than what is measured.
    The processes in ``exclude`` (a meter) are left out, not their descendants."""
    if not pids:
        return 0.0
    parents: dict[int, int] = {}
    usage: dict[int, int] = {}
    # A process or thread may end while /proc is walked: each is read on its own, and
    # one gone meanwhile is skipped (globbing the whole tree raised when a directory
    # went between listing and descending).
    for name in _pids():
        try:
            with os.scandir(f"/proc/{name}/task") as tasks:
                tids = [entry.name for entry in tasks]
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{name}/task/{tid}/stat").read_text()
                ran = int(Path(f"/proc/{name}/task/{tid}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):  # the thread ended meanwhile
                continue
            pid = int(name)
            parents[pid] = _parent(stat)
            usage[pid] = usage.get(pid, 0) + ran
    total = 0
    for pid in usage:
        if pid in exclude:
            continue
        ancestor = pid
        while ancestor > 1 and ancestor not in pids:
            ancestor = parents.get(ancestor, 0)
        if ancestor in pids:
            total += usage[pid]
    return total / 1e9
