"""What the commands share: option groups, usage mistakes, the errors shown as one line,
and opening the grant layer as ``--grants``, ``--kernel`` and the limits ask.

Each ``add_*`` function adds its options to a parser, in the order ``--help`` lists them
(plain options, no argparse groups, so every command's help reads as one list).
"""

from __future__ import annotations

import argparse
import logging
import os

from .. import options
from ..grants.files import UnsafeDirectory
from ..grants.halves import GrantHalves, open_halves, open_vm_half
from ..grants.params import KERNELS
from ..grants.select import CHOICES as GRANTS_CHOICES
from ..grants.select import GrantsChoiceError, choose
from ..relay.eventloop import CHOICES as LOOP_CHOICES
from ..relay.eventloop import LoopChoiceError
from ..relay.listener import AddressError
from ..relay.server import DEFAULT_STALL_TIMEOUT
from ..wire.codec import DEFAULT_MAX_MESSAGE_SIZE
from ..wire.protocol import ProtocolLoadError

log = logging.getLogger("qubesshm")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class UsageError(ValueError):
    """A mistake in how qubesshm was called: exit status 2, as argparse's. Raised by a
    command's ``check``, it is shown with that command's usage, as argparse shows its own."""


class CommandError(Exception):
    """One line for the user, shown as ``qubesshm: LINE``: exit status 1."""


# Raised anywhere in a command's check or main, these are one line, ``qubesshm: ...``, and
# exit status 1, never a traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    AddressError, ProtocolLoadError, GrantsChoiceError, UnsafeDirectory, LoopChoiceError,
    CommandError)


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (or unset)."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{name}={os.environ[name]!r} is not a boolean: use 1, true, yes or on "
                     "to turn it on, 0, false, no or off (or unset it) to turn it off")


def verbose_parent() -> argparse.ArgumentParser:
    """``-v`` after a (sub)command too; SUPPRESS keeps one given before it."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log connections")
    return parent


def add_subcommand(subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
                   help: str) -> argparse.ArgumentParser:
    """A (sub)command's parser, taking ``-v``; its usage is the one shown for its mistakes
    (each sets itself as a default: the deepest one given wins)."""
    parser = subparsers.add_parser(name, parents=[verbose_parent()], help=help)
    parser.set_defaults(usage_parser=parser)
    return parser


# --- the Wayland side: where to listen, where the compositor is, the wire --------------

def add_socket_option(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--socket", default=default, metavar="NAME",
                        help="listening socket name in $XDG_RUNTIME_DIR, or an absolute path"
                        + (f" (default {default})" if default else
                           " (default: a private name)"))


def add_upstream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="NAME|PATH",
                        help="compositor socket (default $WAYLAND_DISPLAY, else wayland-0)")


def add_wire_options(parser: argparse.ArgumentParser) -> None:
    """The protocol log, the protocols understood, and the limits on every message."""
    parser.add_argument("--debug", action="store_true",
                        help="log every relayed message (also QUBESSHM_DEBUG=1)")
    parser.add_argument("--protocol-dir", action="append", default=[], metavar="DIR",
                        help="more protocol XML to understand (repeatable)")
    parser.add_argument("--max-message-size", type=options.message_size,
                        default=DEFAULT_MAX_MESSAGE_SIZE,
                        metavar="BYTES", help="largest message accepted (default %(default)s)")
    parser.add_argument("--stall-timeout", type=options.seconds, default=DEFAULT_STALL_TIMEOUT,
                        metavar="SECONDS", help="drop a session whose peer stops reading for "
                        "this long (default %(default)s)")


RELAY_LOOP_HELP = ("the event loop the relay runs on: uvloop, asyncio's own, or uvloop when "
                   "installed (default %(default)s)")


def add_event_loop_option(parser: argparse.ArgumentParser, help: str = RELAY_LOOP_HELP) -> None:
    parser.add_argument("--event-loop", choices=LOOP_CHOICES, default="auto", help=help)


def add_relay_options(parser: argparse.ArgumentParser, default_socket: str | None) -> None:
    """A proxy's: its socket, the compositor's, the wire, the event loop."""
    add_socket_option(parser, default_socket)
    add_upstream_option(parser)
    add_wire_options(parser)
    add_event_loop_option(parser)


# --- the grant layer ----------------------------------------------------------------------

def add_grants_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grants", choices=GRANTS_CHOICES, default=None,
                        help="grant backend: the simulated hypervisor (a kernel of this "
                        "command's own, with a Qubes VM's parameters unless --kernel "
                        "stock), real Xen through /dev/xen, or xen when /dev/xen/gntalloc "
                        "exists (default: $QUBESSHM_GRANTS, else auto)")


def add_kernel_option(parser: argparse.ArgumentParser) -> None:
    """The simulated kernel's parameters (``run`` has its own, which also picks the
    report's findings)."""
    parser.add_argument("--kernel", choices=("stock", "qubes"),
                        help="the parameters the simulated kernel boots with: qubes, a Qubes "
                        "VM's (gntalloc limit 2^30 pages, free_per_iteration 1000; the "
                        "default), or stock, Linux's own (1024, 10); on real Xen they are "
                        "the machine's (qubesshm tune)")


def add_gntalloc_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gntalloc-limit", type=options.gntalloc_limit, metavar="PAGES",
                        help="raise the kernel's gntalloc limit to this many pages at "
                        "start-up (Qubes sets 1073741824; Linux's default, 1024 pages, is "
                        "less than one 1920x1080 buffer)")


def add_dmabuf_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-dmabuf", action="store_true",
                        help="relay zwp_linux_dmabuf_v1 (hidden by default: dma-buf cannot "
                        "cross a VM boundary, so toolkits fall back to wl_shm)")


def add_cache_options(parser: argparse.ArgumentParser) -> None:
    """Grant pages kept for reuse, and the most one client may hold."""
    parser.add_argument("--cache-pages", type=options.pages, metavar="PAGES",
                        help="grant pages kept for reuse by later buffers (default: a "
                        "quarter of the gntalloc limit; 0 ends grants as soon as unmapped)")
    parser.add_argument("--client-pages", type=options.positive_pages, metavar="PAGES",
                        help="grant pages one client may hold, in use and cached (default: "
                        "half of the gntalloc limit); past it the client gets no_memory")


def add_late_options(parser: argparse.ArgumentParser) -> None:
    """Grants the GUI domain keeps mapped late: how long to wait, the deferred path after."""
    parser.add_argument("--late-timeout", type=options.seconds, default=2.0, metavar="SECONDS",
                        help="how long the compositor may keep a let-go buffer mapped before "
                        "its grants go to the kernel's deferred reclaim (default %(default)s)")
    parser.add_argument("--defer-batch", type=options.positive_pages, default=2048, metavar="PAGES",
                        help="most pages handed to deferred reclaim per second "
                        "(default %(default)s)")
    parser.add_argument("--sim-watch", type=options.pid, action="append", default=[],
                        metavar="PID", help="simulated grants: count this process's mmaps "
                        "of grant pages as the GUI domain's, as the compositor's are (a "
                        "process that holds mappings late; repeatable)")
    parser.add_argument("--drain-target", type=options.seconds, default=2.0, metavar="SECONDS",
                        help="raise free_per_iteration so the proxy's deferred backlog "
                        "drains within this time (default %(default)s)")


def add_reclaim_options(parser: argparse.ArgumentParser) -> None:
    """How the proxy ends grants (for comparison), and a simulated late compositor."""
    parser.add_argument("--reclaim", choices=("notify", "at-once"), default="notify",
                        help="end grants on their unmap notify (default), or at once when "
                        "a buffer goes, with no cache and free_per_iteration left alone, "
                        "as a GUI agent without unmap notify does (for comparison)")
    parser.add_argument("--sim-hold", type=options.non_negative_seconds, default=0.0,
                        metavar="SECONDS", help="simulated grants only: the GUI domain "
                        "keeps each area mapped this long after the proxy lets it go, as "
                        "a compositor that releases late (default 0)")


def add_buffer_options(parser: argparse.ArgumentParser) -> None:
    """A proxy's: the limits, dma-buf, the cache, late grants, the reclaim mode."""
    add_gntalloc_limit_option(parser)
    add_dmabuf_option(parser)
    add_cache_options(parser)
    add_late_options(parser)
    add_reclaim_options(parser)


def add_report_options(parser: argparse.ArgumentParser) -> None:
    """The report at exit: also as JSON, or nothing at all."""
    parser.add_argument("--report-json", type=options.output_file, metavar="FILE",
                        help="also write the report at exit to FILE as JSON")
    parser.add_argument("--quiet", action="store_true",
                        help="print nothing but errors: no report and no summary at exit")


def check_grants(args: argparse.Namespace, command: str) -> str | None:
    """The usage mistakes of ``--grants`` with ``--kernel``, ``--sim-hold`` and
    ``--sim-watch`` (each for the simulated layer only), found before anything opens.
    Raises ``GrantsChoiceError`` for an unknown ``$QUBESSHM_GRANTS``."""
    if choose(args.grants) != "xen":
        return None
    if getattr(args, "kernel", None) in ("stock", "qubes"):
        return (f"qubesshm {command}: --kernel {args.kernel} sets the simulated grant "
                "layer's parameters; on real Xen they are the machine's (see qubesshm "
                "tune)")
    if getattr(args, "sim_hold", 0.0):
        return "qubesshm: --sim-hold needs the simulated grant layer (--grants sim)"
    if getattr(args, "sim_watch", None):
        return "qubesshm: --sim-watch needs the simulated grant layer (--grants sim)"
    return None


def open_grants(args: argparse.Namespace, *, split: bool = False) -> GrantHalves:
    """The grant layer ``--grants`` names (a simulated kernel booted with ``--kernel``'s
    parameters), with ``--gntalloc-limit`` set and ``--sim-watch``'s processes watched.
    ``split``: only the sharing half (a split proxy's VM side). Raises ``CommandError``
    when it cannot be had; the caller closes what it returns."""
    kernel = KERNELS["stock" if getattr(args, "kernel", None) == "stock" else "qubes"]
    try:
        if split:
            choice = choose(args.grants)
            grants = open_vm_half(choice, vm_domid(choice), kernel)
        else:
            grants = open_halves(choose(args.grants), kernel)
    except OSError as exc:
        raise CommandError(f"{exc.strerror or exc}") from exc
    try:
        if getattr(args, "gntalloc_limit", None) is not None:
            try:
                grants.sharing.backend.set_gntalloc_limit(args.gntalloc_limit)
            except OSError as exc:
                raise CommandError(f"cannot set the gntalloc limit: {exc.strerror or exc}") \
                    from exc
        for pid in getattr(args, "sim_watch", []):
            try:
                grants.watch_compositor(pid)
            except OSError as exc:
                raise CommandError(f"--sim-watch {pid}: {exc.strerror or exc}") from exc
    except BaseException:
        grants.close()
        raise
    log.info("grant backend: %s", grants.name)
    return grants


# --- a split proxy --------------------------------------------------------------------------

def add_remote_options(parser: argparse.ArgumentParser) -> None:
    """The VM side of a split proxy: how it reaches the host half."""
    parser.add_argument("--remote", metavar="CMD",
                        help="split proxy: instead of a compositor socket, start CMD (split "
                        "as a shell would split it, no shell features) and speak to the "
                        "host half over its stdin and stdout; in a qube: "
                        "'qrexec-client-vm GUI_VM qubesshm.Host', off Xen: 'qubesshm host'")
    parser.add_argument("--remote-socket", metavar="PATH",
                        help="split proxy: the host half's stream is this Unix socket")
    parser.add_argument("--remote-timeout", type=options.seconds, default=30.0,
                        metavar="SECONDS",
                        help="how long the host half has to answer at start (default 30)")


def check_remote(args: argparse.Namespace, command: str) -> str | None:
    if args.remote and args.remote_socket:
        return f"qubesshm {command}: give --remote CMD or --remote-socket PATH, not both"
    if args.remote is not None:
        import shlex

        try:
            argv = shlex.split(args.remote)
        except ValueError as exc:
            return f"qubesshm {command}: --remote {args.remote!r}: {exc}"
        if not argv:
            return f"qubesshm {command}: --remote needs a command"
    if (args.remote or args.remote_socket) and getattr(args, "allow_dmabuf", False):
        return (f"qubesshm {command}: --allow-dmabuf cannot go with a split proxy: a "
                "dma-buf cannot cross to the GUI domain (only pools of grants, pipes and "
                "readable files do)")
    if (args.remote or args.remote_socket) and args.upstream:
        return (f"qubesshm {command}: --upstream names the compositor of an unsplit proxy; "
                "with --remote the host half connects to the compositor (qubesshm host "
                "--upstream NAME)")
    return None


def vm_domid(choice: str) -> int:
    """This VM's domain id: the simulated kernel's VM, or real Xen's own (xenstore)."""
    from ..grants.select import SIM_DOMID

    if choice != "xen":
        return SIM_DOMID
    return own_xen_domid()


def own_xen_domid() -> int:
    """This domain's id on real Xen: 0 in dom0 (the control domain), else xenstore's."""
    import subprocess

    try:
        with open("/proc/xen/capabilities") as caps:
            if "control_d" in caps.read():
                return 0
    except OSError:
        pass
    try:
        out = subprocess.run(["xenstore-read", "domid"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        return int(out.strip())
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise CommandError(f"cannot learn this domain's id (xenstore-read domid: {exc}); "
                           "the two halves of a split proxy on Xen need each other's") \
            from exc
