"""Where a vchan lives: domain ids, ports, and the socket vchan's file names.

The socket vchan (QubesOS/qubes-core-vchan-socket) names the server's socket
``DIR/vchan.<server domid>.<client domid>.<port>.sock``, ``DIR`` being
``$VCHAN_SOCKET_DIR`` or ``/var/run/vchan``; a process's own domain id there is
``$VCHAN_DOMAIN`` read with ``atoi`` (0 when unset). On Xen a VM's GUI domain is
QubesDB's ``/qubes-gui-domain-xid``. Everything here is pure except
``default_gui_domid``, which may run ``qubesdb-read``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qubesshm.vchan.stream import VchanError

GUI_PORT = 6000
"""The vchan port of the GUI protocol."""
DOMID_FIRST_RESERVED = 0x7FF0
"""Xen domain ids from here on are special (DOMID_SELF, ...); no vchan peer has one."""
DEFAULT_SOCKET_DIR = Path("/var/run/vchan")
SUN_PATH_MAX = 107
"""Bytes of a Unix socket path, without its NUL (the socket vchan silently truncates)."""


def check_domid(value: int, what: str) -> int:
    """``value`` if it can be a peer's domain id, else a ``VchanError`` naming ``what``."""
    if not 0 <= value < DOMID_FIRST_RESERVED:
        raise VchanError(f"{what} {value} is not a domain id: give a number from 0 to "
                         f"{DOMID_FIRST_RESERVED - 1}")
    return value


def socket_path(directory: Path | str, server_domid: int, client_domid: int,
                port: int) -> Path:
    """The socket vchan's file for a vchan served by ``server_domid`` to ``client_domid``."""
    check_domid(server_domid, "server domain")
    check_domid(client_domid, "client domain")
    if port < 0:
        raise VchanError(f"vchan port {port} is negative")
    path = Path(directory) / f"vchan.{server_domid}.{client_domid}.{port}.sock"
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise VchanError(f"vchan socket path {path} is longer than {SUN_PATH_MAX} bytes, "
                         "the limit of a Unix socket: set VCHAN_SOCKET_DIR to a shorter path")
    return path


def default_socket_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$VCHAN_SOCKET_DIR``, else ``/var/run/vchan``, as the socket vchan chooses."""
    env = os.environ if environ is None else environ
    value = env.get("VCHAN_SOCKET_DIR")
    if value is None:
        return DEFAULT_SOCKET_DIR
    if not value:
        raise VchanError("VCHAN_SOCKET_DIR is set but empty (the socket vchan would then use "
                         "/): unset it for /var/run/vchan, or give a directory")
    return Path(value)


def _atoi(text: str) -> int:
    """C ``atoi``: leading blanks, a sign, digits; anything else ends the number (0 if none)."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?[0-9]+)", text)
    return int(match.group(1)) if match else 0


def own_domid_from_env(environ: Mapping[str, str] | None = None) -> int:
    """This process's domain id as the socket vchan reads it: ``$VCHAN_DOMAIN``, 0 if
    unset. A value ``atoi`` would read differently from its plain meaning is an error
    (with what the socket vchan would make of it), never a silent guess."""
    env = os.environ if environ is None else environ
    raw = env.get("VCHAN_DOMAIN")
    if raw is None:
        return 0
    if not re.fullmatch(r"[0-9]+", raw.strip()):
        raise VchanError(f"VCHAN_DOMAIN={raw!r} is not a domain id (the socket vchan would "
                         f"read it as {_atoi(raw)}): set it to a number, or unset it for 0")
    return check_domid(int(raw), "VCHAN_DOMAIN")


QUBESDB_GUI_DOMAIN_KEY = "/qubes-gui-domain-xid"


def default_gui_domid(qubesdb_read: str | None = None) -> int:
    """The GUI daemon's domain: QubesDB's ``/qubes-gui-domain-xid`` where ``qubesdb-read``
    exists (a Qubes VM), else 0 (dom0). ``qubesdb_read`` overrides the command's path."""
    command = qubesdb_read if qubesdb_read is not None else shutil.which("qubesdb-read")
    if command is None:
        return 0
    try:
        result = subprocess.run([command, QUBESDB_GUI_DOMAIN_KEY], capture_output=True,
                                text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VchanError(f"cannot run {command} {QUBESDB_GUI_DOMAIN_KEY} ({exc}): give "
                         "--gui-domid") from exc
    value = result.stdout.strip()
    if result.returncode != 0:
        why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[0]
        raise VchanError(f"cannot read {QUBESDB_GUI_DOMAIN_KEY} from QubesDB ({why}): this "
                         "qube has no GUI domain (qvm-prefs guivm); give --gui-domid")
    if not re.fullmatch(r"[0-9]+", value):
        raise VchanError(f"QubesDB {QUBESDB_GUI_DOMAIN_KEY} is {value!r}, not a domain id: "
                         "give --gui-domid")
    return check_domid(int(value), f"QubesDB {QUBESDB_GUI_DOMAIN_KEY}")


@dataclass(frozen=True, slots=True)
class VchanAddress:
    """One end's view of a vchan: its own domain, the peer's, and the port."""

    domid: int
    remote_domid: int
    port: int = GUI_PORT

    def __post_init__(self) -> None:
        check_domid(self.domid, "domain")
        check_domid(self.remote_domid, "remote domain")
        if self.port < 0:
            raise VchanError(f"vchan port {self.port} is negative")

    def server_socket(self, directory: Path | str | None = None) -> Path:
        """The socket file when this end serves (the GUI agent's case)."""
        where = default_socket_dir() if directory is None else directory
        return socket_path(where, self.domid, self.remote_domid, self.port)

    def client_socket(self, directory: Path | str | None = None) -> Path:
        """The socket file when this end connects (the GUI daemon's case)."""
        where = default_socket_dir() if directory is None else directory
        return socket_path(where, self.remote_domid, self.domid, self.port)
