"""What ``serve`` and ``run`` share: the proxy started on the grant layer and event loop
the options name, its start-up checks, and the summary at exit."""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..grants.halves import GrantHalves
from ..grants.ledger import GrantLedger
from ..grants.lifetimes import DEFAULT_CLIENT_PAGES, LifetimePolicy, pages_for
from ..grants.params import KERNELS
from ..grants.remote import RemoteMappingHalf
from ..relay.control import ControlSocket, snapshot, stats_path, summary_line
from ..relay.eventloop import loop_factory
from ..relay.fastpath import select_fast_path
from ..relay.listener import (
    DEFAULT_SOCKET_NAME,
    AddressError,
    Listener,
    runtime_path,
    upstream_path,
)
from ..relay.probe import output_sizes
from ..relay.server import ProxyServer, RelayOptions
from ..relay.trace import ProtocolLog
from ..wire.protocol import ProtocolTable, load_protocols
from .common import CommandError, open_grants

if TYPE_CHECKING:
    from ..stream.vmside import RemoteUpstream

# What a proxy command does once the grant layer is open, on the event loop: given its
# arguments, the protocols understood, the relay's options, the grants and the loop's name.
ProxyWork = Callable[[argparse.Namespace, ProtocolTable, RelayOptions, GrantHalves, str],
                     Coroutine[Any, Any, int]]


def run_proxy(args: argparse.Namespace, work: ProxyWork) -> int:
    """Load the protocols, open the grant layer, and run ``work`` on the event loop
    ``--event-loop`` names; the grants are closed after. A split proxy (``--remote``)
    opens only the sharing half here: the host half maps."""
    protocol = load_protocols(args.protocol_dir)
    grants = open_grants(args, split=split(args))
    try:
        relay_options = RelayOptions(max_message_size=args.max_message_size,
                                     stall_timeout=args.stall_timeout,
                                     allow_dmabuf=args.allow_dmabuf)
        factory, loop_name = loop_factory(args.event_loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(work(args, protocol, relay_options, grants, loop_name))
    finally:
        grants.close()


def split(args: argparse.Namespace) -> bool:
    """A split proxy: the compositor is reached through the host half."""
    return bool(getattr(args, "remote", None) or getattr(args, "remote_socket", None))


async def start_any(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
                    socket_name: str, grants: GrantHalves) -> ProxyServer:
    """The proxy ``args`` ask for: relaying to a compositor here, or split."""
    if split(args):
        return await start_split(args, protocol, options, socket_name, grants)
    return start(args, protocol, options, socket_name, grants)


async def start_split(args: argparse.Namespace, protocol: ProtocolTable,
                      options: RelayOptions, socket_name: str,
                      grants: GrantHalves) -> ProxyServer:
    """A split proxy's VM side: the host half reached and greeted, then the listener."""
    from ..stream.vmside import RemoteError, RemoteUpstream, reach_host

    loop = asyncio.get_running_loop()
    if grants.hypercalls is not None:
        grants.hypercalls.start(loop)
    try:
        reached = await reach_host(args.remote, args.remote_socket, grants)
    except RemoteError as exc:
        raise CommandError(str(exc)) from exc
    assert isinstance(grants.mapping, RemoteMappingHalf)
    remote = RemoteUpstream(loop, reached.read_fd, reached.write_fd, grants.mapping,
                            grants.sharing.own_domid, what=reached.what,
                            process=reached.process)
    try:
        host = await remote.greeted(args.remote_timeout)
        grants.sharing.peer_domid = host.domid
        remote.port = grants.sharing.open_channel()
        remote.start_channel(remote.port)
    except (RemoteError, OSError) as exc:
        await remote.aclose(give_up=True)
        raise CommandError(f"{exc}") from exc
    try:
        return _listen(args, protocol, options, socket_name, grants, None, remote)
    except BaseException:
        await remote.aclose()
        raise


def start(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
          socket_name: str, grants: GrantHalves) -> ProxyServer:
    upstream = upstream_path(args.upstream)
    # Checked before the listener exists: taking the name removes a stale file there.
    if runtime_path(socket_name).resolve() == upstream.resolve():
        if unanswered(upstream) is None:
            raise AddressError(f"{upstream} is the compositor's socket (a compositor answers "
                               "there), so qubesshm cannot listen on it: give qubesshm a name "
                               "of its own with --socket (serve's default is "
                               f"{DEFAULT_SOCKET_NAME})")
        raise AddressError(f"the upstream {upstream} is the socket qubesshm was asked to "
                           "listen on, and no compositor answers there: give the compositor's "
                           "socket with --upstream or WAYLAND_DISPLAY")
    probe_upstream(upstream)
    check_screen_fits(args, grants, upstream, protocol)
    return _listen(args, protocol, options, socket_name, grants, upstream, None)


def _listen(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
            socket_name: str, grants: GrantHalves, upstream: Path | None,
            remote: RemoteUpstream | None) -> ProxyServer:
    listener = Listener(socket_name)
    if grants.kernel_dir is not None:
        grants.kernel_dir.note_socket(listener.path)
    protocol_log = ProtocolLog(sys.stderr) if args.debug else None
    policy = LifetimePolicy(cache_pages=args.cache_pages, client_pages=args.client_pages,
                            late_timeout=args.late_timeout, defer_batch=args.defer_batch,
                            drain_target=args.drain_target,
                            end_at_once=args.reclaim == "at-once", hold=args.sim_hold)
    server = ProxyServer(protocol, listener, upstream or Path("(the host half)"),
                         options=options, protocol_log=protocol_log, grants=grants,
                         ledger=GrantLedger(), policy=policy, remote=remote)
    try:
        server.control = ControlSocket(stats_path(listener.path), lambda: _stats(server))
    except (OSError, AddressError) as exc:
        server.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise AddressError(f"cannot listen for qubesshm stats on "
                           f"{stats_path(listener.path)}: {why}") from exc
    return server


def _stats(server: ProxyServer) -> dict[str, Any]:
    stats = snapshot(server.ledger, server.grants, server.lifetimes)
    if server.remote is not None:
        stats["half"] = "vm"
        stats["stream"] = server.remote.snapshot()
    return stats


def where(server: ProxyServer, grants: GrantHalves, loop_name: str) -> str:
    # Which fast path the relay runs: the compiled core, or why not.
    fast_path = f"fast path: {select_fast_path()[1]}"
    if server.remote is not None:
        return (f"listening on {server.listener.path}, relaying through {server.remote.what} "
                f"(domain {grants.sharing.peer_domid}), grants: {grants.name} as domain "
                f"{grants.sharing.own_domid} ({len(server.protocol)} interfaces known), "
                f"{fast_path}, event loop: {loop_name}")
    return (f"listening on {server.listener.path}, relaying to {server.upstream}, grants: "
            f"{grants.name} ({len(server.protocol)} interfaces known), {fast_path}, "
            f"event loop: {loop_name}")


# A 16384x16384 output (the largest X and most compositors take) in ARGB8888.
LARGEST_OUTPUT_PAGES = pages_for(16384 * 16384 * 4)


def check_screen_fits(args: argparse.Namespace, grants: GrantHalves, upstream: Path,
                      protocol: ProtocolTable) -> None:
    """Say at start, in one line, when the limits cannot hold one window the size of
    the compositor's largest output (a maximized or fullscreen app): such a window
    would be refused with no_memory. The compositor is asked only when a limit is
    smaller than any output could need."""
    try:
        limit = grants.sharing.backend.status().gntalloc_limit
    except OSError:
        limit = None
    smallest = min(limit if limit is not None else LARGEST_OUTPUT_PAGES,
                   args.client_pages if args.client_pages is not None
                   else LARGEST_OUTPUT_PAGES)
    if smallest >= LARGEST_OUTPUT_PAGES:
        return
    sizes = output_sizes(upstream, protocol, timeout=2.0)
    if not sizes:
        return
    width, height = max(sizes, key=lambda s: s[0] * s[1])
    need = pages_for(width * height * 4)
    screen = (f"the {need} pages that one window the size of the compositor's "
              f"{width}x{height} output needs: such a window will be refused")
    if limit is not None and limit < need:
        target = max(need, KERNELS["qubes"].gntalloc_limit)
        print(f"qubesshm {args.command}: the gntalloc limit is {limit} pages, less than "
              f"{screen}; raise the limit with --gntalloc-limit {target} (or qubesshm tune "
              f"--gntalloc-limit {target}), as Qubes does in its VMs", file=sys.stderr,
              flush=True)
    elif args.client_pages is not None and args.client_pages < need:
        print(f"qubesshm {args.command}: --client-pages {args.client_pages} is less than "
              f"{screen}; give at least {need} (the default, {DEFAULT_CLIENT_PAGES}, holds "
              "three 3840x2160 windows and a cache)", file=sys.stderr, flush=True)


def unanswered(path: Path) -> OSError | None:
    """Why nothing accepts a connection at ``path``; None if something does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(5)
        try:
            probe.connect(str(path))
        except OSError as exc:
            return exc
    return None


def probe_upstream(upstream: Path) -> None:
    """A clear error at start-up when no compositor answers, not at the first client."""
    exc = unanswered(upstream)
    if exc is not None:
        raise AddressError(f"no compositor answers at {upstream} "
                           f"({exc.strerror or exc}): start one, or give its socket with "
                           "--upstream or WAYLAND_DISPLAY") from exc


def summary(server: ProxyServer, grants: GrantHalves) -> None:
    print(f"qubesshm: summary: {summary_line(snapshot(server.ledger, grants, server.lifetimes))}",
          file=sys.stderr)
