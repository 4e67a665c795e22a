"""Command line: ``qubesshm serve``, ``qubesshm run -- CMD`` and ``qubesshm bench``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import __version__, options
from .bench.churn import POLICIES as CHURN_POLICIES
from .bench.churn import run_churn_bench
from .grants.files import UnsafeDirectory, check_output, write_output
from .grants.halves import GrantHalves, open_halves
from .grants.ledger import GrantLedger
from .grants.lifetimes import (
    DEFAULT_CLIENT_PAGES,
    LifetimePolicy,
    pages_for,
)
from .grants.params import KERNELS
from .grants.select import (
    CHOICES,
    GrantsChoiceError,
    choose,
)
from .relay.control import (
    ControlSocket,
    StatsError,
    format_table,
    read_stats,
    snapshot,
    stats_path,
    summary_line,
)
from .relay.eventloop import CHOICES as LOOP_CHOICES
from .relay.eventloop import LoopChoiceError, loop_factory
from .relay.listener import (
    DEFAULT_SOCKET_NAME,
    AddressError,
    Listener,
    runtime_path,
    upstream_path,
)
from .relay.probe import output_sizes
from .relay.server import DEFAULT_STALL_TIMEOUT, ProxyServer, RelayOptions
from .relay.trace import ProtocolLog, wayland_timestamp
from .report import KERNEL_CHOICES, build_report, format_report, kernels_for
from .tune import run_tune
from .wire.codec import DEFAULT_MAX_MESSAGE_SIZE
from .wire.protocol import ProtocolLoadError, ProtocolTable, load_protocols

log = logging.getLogger("qubesshm")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class UsageError(ValueError):
    """A mistake in how qubesshm was called: exit status 2, as argparse's."""


def env_flag(name: str) -> bool:
    """A boolean environment variable: 1/true/yes/on or 0/false/no/off (or unset)."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"{name}={os.environ[name]!r} is not a boolean: use 1, true, yes or on "
                     "to turn it on, 0, false, no or off (or unset it) to turn it off")








def _add_relay_options(parser: argparse.ArgumentParser, default_socket: str | None) -> None:
    parser.add_argument("--socket", default=default_socket, metavar="NAME",
                        help="listening socket name in $XDG_RUNTIME_DIR, or an absolute path"
                        + (f" (default {default_socket})" if default_socket else
                           " (default: a private name)"))
    parser.add_argument("--upstream", metavar="NAME|PATH",
                        help="compositor socket (default $WAYLAND_DISPLAY, else wayland-0)")
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
    parser.add_argument("--event-loop", choices=LOOP_CHOICES, default="auto",
                        help="the event loop the relay runs on: uvloop, asyncio's own, or "
                        "uvloop when installed (default %(default)s)")


def _add_grants_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grants", choices=CHOICES, default=None,
                        help="grant backend: the simulated hypervisor (a kernel of this "
                        "command's own, with a Qubes VM's parameters unless --kernel "
                        "stock), real Xen through /dev/xen, or xen when /dev/xen/gntalloc "
                        "exists (default: $QUBESSHM_GRANTS, else auto)")


def _add_buffer_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gntalloc-limit", type=options.gntalloc_limit, metavar="PAGES",
                        help="raise the kernel's gntalloc limit to this many pages at "
                        "start-up (Qubes sets 1073741824; Linux's default, 1024 pages, is "
                        "less than one 1920x1080 buffer)")
    parser.add_argument("--allow-dmabuf", action="store_true",
                        help="relay zwp_linux_dmabuf_v1 (hidden by default: dma-buf cannot "
                        "cross a VM boundary, so toolkits fall back to wl_shm)")
    parser.add_argument("--cache-pages", type=options.pages, metavar="PAGES",
                        help="grant pages kept for reuse by later buffers (default: a "
                        "quarter of the gntalloc limit; 0 ends grants as soon as unmapped)")
    parser.add_argument("--client-pages", type=options.positive_pages, metavar="PAGES",
                        help="grant pages one client may hold, in use and cached (default: "
                        "half of the gntalloc limit); past it the client gets no_memory")
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
    parser.add_argument("--reclaim", choices=("notify", "at-once"), default="notify",
                        help="end grants on their unmap notify (default), or at once when "
                        "a buffer goes, with no cache and free_per_iteration left alone, "
                        "as a GUI agent without unmap notify does (for comparison)")
    parser.add_argument("--sim-hold", type=options.non_negative_seconds, default=0.0,
                        metavar="SECONDS", help="simulated grants only: the GUI domain "
                        "keeps each area mapped this long after the proxy lets it go, as "
                        "a compositor that releases late (default 0)")














def _add_bench_upstream(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="NAME|PATH",
                        help="compositor to measure against (default: a headless Weston "
                        "started for the run, whatever $WAYLAND_DISPLAY names)")
    parser.add_argument("--animations", choices=("on", "off"), default=None,
                        help="the started Weston's desktop shell: on, as shipped (a close "
                        "animation keeps a closed window's last buffer about a second; the "
                        "default), or off")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubesshm",
        description="A Wayland proxy that validates and relays every message between "
        "clients and the compositor, and backs every shm buffer the compositor sees with "
        "Xen grant pages it owns.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log connections")
    parser.add_argument("--version", action="version", version=f"qubesshm {__version__}")
    # -v is taken after the subcommand too; SUPPRESS keeps one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log connections")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", parents=[common],
                           help="relay Wayland clients to the compositor")
    _add_relay_options(serve, DEFAULT_SOCKET_NAME)
    _add_grants_option(serve)
    _add_buffer_options(serve)
    serve.add_argument("--kernel", choices=("stock", "qubes"),
                       help="the parameters the simulated kernel boots with: qubes, a Qubes "
                       "VM's (gntalloc limit 2^30 pages, free_per_iteration 1000; the "
                       "default), or stock, Linux's own (1024, 10); on real Xen they are "
                       "the machine's (qubesshm tune)")

    run = sub.add_parser("run", parents=[common],
                         help="run one command through a private proxy")
    _add_relay_options(run, None)
    _add_grants_option(run)
    _add_buffer_options(run)
    run.add_argument("--kernel", choices=KERNEL_CHOICES, default=None,
                     help="kernel parameters for the simulated grant layer and the "
                     "report's findings: stock (Linux's: gntalloc limit 1024, "
                     "free_per_iteration 10), qubes (a Qubes VM's: 2^30, 1000), or both "
                     "(run on qubes', report on both; the default)")
    run.add_argument("--report-json", metavar="FILE",
                     help="also write the report at exit to FILE as JSON")
    run.add_argument("--quiet", action="store_true",
                     help="print nothing but errors: no report and no summary at exit")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    tune = sub.add_parser("tune", parents=[common],
                          help="show or set the kernel's grant reclaim parameters")
    _add_grants_option(tune)
    tune.add_argument("--socket", metavar="NAME",
                      help="simulated grants: the kernel of the proxy serving this socket "
                      "(needed when several run)")
    tune.add_argument("--free-per-iteration", type=options.u32, metavar="N",
                      help="deferred grants retried per 1-second tick (0: all)")
    tune.add_argument("--gntalloc-limit", type=options.gntalloc_limit, metavar="N",
                      help="pages gntalloc may have granted at once")

    stats = sub.add_parser("stats", parents=[common], help="show a running proxy's counters")
    stats.add_argument("--socket", default=DEFAULT_SOCKET_NAME, metavar="NAME",
                       help="the proxy's socket name or path (default %(default)s)")
    stats.add_argument("--json", action="store_true", help="print JSON")

    bench = sub.add_parser("bench", parents=[common], help="measure the proxy against baselines")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    relay = bench_sub.add_parser("relay", parents=[common],
                                 help="round-trip latency: direct, qubesshm, waypipe")
    _add_bench_upstream(relay)
    relay.add_argument("--round-trips", type=options.positive, default=2000,
                       help="wl_display.sync round trips per path and run (default "
                       "%(default)s)")
    relay.add_argument("--burst", type=options.positive, default=10000,
                       help="requests in the burst test (default %(default)s)")
    relay.add_argument("--bursts", type=options.positive, default=3,
                       help="bursts per path and run; the median is reported (default "
                       "%(default)s)")
    relay.add_argument("--repeats", type=options.positive, default=3,
                       help="runs, each printed, then the median of their ratios (default "
                       "%(default)s)")
    relay.add_argument("--no-waypipe", action="store_true", help="skip the waypipe baseline")
    relay.add_argument("--event-loop", choices=LOOP_CHOICES, default="auto",
                       help="the event loop of the qubesshm under test (default %(default)s)")
    frames = bench_sub.add_parser(
        "frames", parents=[common],
        help="frame rate and copy cost of 1920x1080 frames: direct, qubesshm, waypipe")
    _add_bench_upstream(frames)
    frames.add_argument("--frames", type=options.positive, default=100,
                        help="timed frames per run (default %(default)s)")
    frames.add_argument("--warmup", type=options.warmup, default=10,
                        help="frames before timing starts, at least 4 so that the proxy's "
                        "output buffers exist (default %(default)s)")
    frames.add_argument("--repeats", type=options.positive, default=3,
                        help="runs per case and path; medians are reported (default %(default)s)")
    frames.add_argument("--region", type=options.region, default=64,
                        help="side of the small damaged square, 1 to 540 (default %(default)s)")
    frames.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    frames.add_argument("--unsealed", action="store_true",
                        help="the client leaves its pool unsealed, so qubesshm reads it with "
                        "preadv rather than mapping it")
    frames.add_argument("--no-waypipe", action="store_true", help="skip the waypipe baseline")
    churn = bench_sub.add_parser(
        "churn", parents=[common],
        help="window churn under each reclaim policy: windows/s, live and deferred grants")
    _add_bench_upstream(churn)
    churn.add_argument("--rate", type=options.rate, default=10.0,
                       help="windows opened a second (default %(default)s)")
    churn.add_argument("--seconds", type=options.seconds, default=10.0,
                       help="how long windows are opened (default %(default)s)")
    churn.add_argument("--size", type=options.window_size, default="1280x720", metavar="WxH",
                       help="window size (default %(default)s)")
    churn.add_argument("--concurrency", type=options.positive, default=1,
                       help="windows open at once (default %(default)s)")
    churn.add_argument("--frames", type=options.positive, default=1,
                       help="frames drawn in each window (default %(default)s)")
    churn.add_argument("--hold", type=options.non_negative_seconds, default=0.0, metavar="S",
                       help="the GUI domain keeps each area mapped S s after it is let go "
                       "(default 0: the compositor's own release)")
    churn.add_argument("--policies", default=",".join(CHURN_POLICIES),
                       help="comma-separated, from " + ", ".join(CHURN_POLICIES)
                       + " (default: all)")
    churn.add_argument("--drain-wait", type=options.non_negative_seconds, default=5.0, metavar="S",
                       help="how long to watch the backlog drain after the last close "
                       "before estimating the rest (default %(default)s)")
    churn.add_argument("--json", metavar="FILE", help="write the results as JSON")
    churn.add_argument("--plot", metavar="FILE",
                       help="plot live grants and deferred backlog over time (PNG)")
    for sub_parser in (serve, run, tune, stats, bench, relay, frames, churn):
        # The deepest one given wins: its usage is shown for its mistakes.
        sub_parser.set_defaults(usage_parser=sub_parser)
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # The usage of the subcommand that was given the unknown arguments, not the top.
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        args.debug = getattr(args, "debug", False) or env_flag("QUBESSHM_DEBUG")
    except UsageError as exc:
        _subparser(parser, args).error(str(exc))
    if getattr(args, "animations", None) is not None and args.upstream is not None:
        _subparser(parser, args).error(
            "--animations sets up the Weston the benchmark starts; the compositor given "
            "with --upstream runs as it was started")
    # Files written at the end are checked now, before any work is done for them.
    for option in ("report_json", "json", "plot"):
        value = getattr(args, option, None)
        if isinstance(value, str):  # stats --json is a flag
            why = check_output(Path(value))
            if why is not None:
                _subparser(parser, args).error(f"argument --{option.replace('_', '-')}: "
                                               f"{why}")
    return args


def _subparser(parser: argparse.ArgumentParser,
               args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the subcommand given (each sets itself as a default), else the top."""
    found = getattr(args, "usage_parser", None)
    return found if isinstance(found, argparse.ArgumentParser) else parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose or getattr(args, "debug", False) else logging.WARNING,
        format="qubesshm: %(message)s",
    )
    if getattr(args, "debug", False):
        # Beside the protocol log, other lines carry its timestamps, and never start
        # with "[" as protocol lines do.
        for handler in logging.getLogger().handlers:
            handler.setFormatter(_TimestampedFormatter())
    _raise_fd_limit()
    try:
        if args.command == "bench":
            try:
                if args.bench == "frames":
                    from .bench.frames import run_frames_bench
                    return run_frames_bench(args)
                if args.bench == "churn":
                    return run_churn_bench(args)
                from .bench.relay import run_relay_bench
                return run_relay_bench(args)
            except (RuntimeError, OSError) as exc:
                print(f"qubesshm bench {args.bench}: {exc}", file=sys.stderr)
                return 1
        if args.command == "tune":
            return run_tune(args)
        if args.command == "stats":
            return _stats(args)
        protocol = load_protocols(args.protocol_dir)
        cmd: list[str] = []
        if args.command == "run":
            cmd = list(args.cmd)
            if cmd and cmd[0] == "--":
                cmd = cmd[1:]
            if not cmd:
                print("qubesshm run: give the command after --", file=sys.stderr)
                return 2
        choice = choose(args.grants)
        if choice == "xen" and args.kernel in ("stock", "qubes"):
            print(f"qubesshm {args.command}: --kernel {args.kernel} sets the simulated grant "
                  "layer's parameters; on real Xen they are the machine's (see qubesshm "
                  "tune)", file=sys.stderr)
            return 2
        kernel = KERNELS["stock" if args.kernel == "stock" else "qubes"]
        if args.command == "run" and args.kernel is None:
            args.kernel = "both"
        try:
            grants = open_halves(choice, kernel)
        except OSError as exc:
            print(f"qubesshm: {exc.strerror or exc}", file=sys.stderr)
            return 1
        try:
            if args.gntalloc_limit is not None:
                try:
                    grants.sharing.backend.set_gntalloc_limit(args.gntalloc_limit)
                except OSError as exc:
                    print(f"qubesshm: cannot set the gntalloc limit: {exc.strerror or exc}",
                          file=sys.stderr)
                    return 1
            if args.sim_hold and grants.hypervisor is None:
                print("qubesshm: --sim-hold needs the simulated grant layer (--grants sim)",
                      file=sys.stderr)
                return 2
            if args.sim_watch:
                if grants.hypervisor is None:
                    print("qubesshm: --sim-watch needs the simulated grant layer "
                          "(--grants sim)", file=sys.stderr)
                    return 2
                for pid in args.sim_watch:
                    try:
                        grants.watch_compositor(pid)
                    except OSError as exc:
                        print(f"qubesshm: --sim-watch {pid}: {exc.strerror or exc}",
                              file=sys.stderr)
                        return 1
            log.info("grant backend: %s", grants.name)
            options = RelayOptions(max_message_size=args.max_message_size,
                                   stall_timeout=args.stall_timeout,
                                   allow_dmabuf=args.allow_dmabuf)
            factory, loop_name = loop_factory(args.event_loop)
            with asyncio.Runner(loop_factory=factory) as runner:
                if args.command == "serve":
                    return runner.run(_serve(args, protocol, options, grants, loop_name))
                return runner.run(_run(args, protocol, options, cmd, grants, loop_name))
        finally:
            grants.close()
    except (AddressError, ProtocolLoadError, GrantsChoiceError, UnsafeDirectory,
            LoopChoiceError) as exc:
        print(f"qubesshm: {exc}", file=sys.stderr)
        return 1


class _TimestampedFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"qubesshm: {wayland_timestamp(time.time_ns())} {record.getMessage()}"


def _raise_fd_limit() -> None:
    """Every relayed fd is open in the proxy for a moment, and each client costs two
    sockets: take the whole hard limit rather than the customary soft 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _stats(args: argparse.Namespace) -> int:
    try:
        stats = read_stats(args.socket)
    except (StatsError, AddressError) as exc:
        print(f"qubesshm stats: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(stats, indent=2) if args.json else format_table(stats))
    return 0




def _start(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
           socket_name: str, grants: GrantHalves) -> ProxyServer:
    upstream = upstream_path(args.upstream)
    # Checked before the listener exists: taking the name removes a stale file there.
    if runtime_path(socket_name).resolve() == upstream.resolve():
        if _unanswered(upstream) is None:
            raise AddressError(f"{upstream} is the compositor's socket (a compositor answers "
                               "there), so qubesshm cannot listen on it: give qubesshm a name "
                               "of its own with --socket (serve's default is "
                               f"{DEFAULT_SOCKET_NAME})")
        raise AddressError(f"the upstream {upstream} is the socket qubesshm was asked to "
                           "listen on, and no compositor answers there: give the compositor's "
                           "socket with --upstream or WAYLAND_DISPLAY")
    _probe_upstream(upstream)
    _check_screen_fits(args, grants, upstream, protocol)
    listener = Listener(socket_name)
    if grants.kernel_dir is not None:
        grants.kernel_dir.note_socket(listener.path)
    protocol_log = ProtocolLog(sys.stderr) if args.debug else None
    policy = LifetimePolicy(cache_pages=args.cache_pages, client_pages=args.client_pages,
                            late_timeout=args.late_timeout, defer_batch=args.defer_batch,
                            drain_target=args.drain_target,
                            end_at_once=args.reclaim == "at-once", hold=args.sim_hold)
    server = ProxyServer(protocol, listener, upstream, options=options,
                         protocol_log=protocol_log, grants=grants, ledger=GrantLedger(),
                         policy=policy)
    try:
        server.control = ControlSocket(stats_path(listener.path),
                                       lambda: snapshot(server.ledger, grants, server.lifetimes))
    except (OSError, AddressError) as exc:
        server.close()
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise AddressError(f"cannot listen for qubesshm stats on "
                           f"{stats_path(listener.path)}: {why}") from exc
    return server


def _where(server: ProxyServer, grants: GrantHalves, loop_name: str) -> str:
    return (f"listening on {server.listener.path}, relaying to {server.upstream}, grants: "
            f"{grants.name} ({len(server.protocol)} interfaces known), event loop: "
            f"{loop_name}")


# A 16384x16384 output (the largest X and most compositors take) in ARGB8888.
LARGEST_OUTPUT_PAGES = pages_for(16384 * 16384 * 4)


def _check_screen_fits(args: argparse.Namespace, grants: GrantHalves, upstream: Path,
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


def _unanswered(path: Path) -> OSError | None:
    """Why nothing accepts a connection at ``path``; None if something does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(5)
        try:
            probe.connect(str(path))
        except OSError as exc:
            return exc
    return None


def _probe_upstream(upstream: Path) -> None:
    """A clear error at start-up when no compositor answers, not at the first client."""
    exc = _unanswered(upstream)
    if exc is not None:
        raise AddressError(f"no compositor answers at {upstream} "
                           f"({exc.strerror or exc}): start one, or give its socket with "
                           "--upstream or WAYLAND_DISPLAY") from exc




def _report(args: argparse.Namespace, server: ProxyServer, grants: GrantHalves) -> bool:
    """Print the run's report (unless ``--quiet``) and write ``--report-json``; False if
    that file could not be written."""
    if args.quiet and not args.report_json:
        return True
    report = build_report(snapshot(server.ledger, grants, server.lifetimes),
                          kernels_for(args.kernel), args.late_timeout)
    if not args.quiet:
        print(format_report(report), file=sys.stderr)
    if args.report_json:
        try:
            write_output(Path(args.report_json), json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            print(f"qubesshm run: cannot write the report to {args.report_json}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return False
    return True


def _summary(server: ProxyServer, grants: GrantHalves) -> None:
    print(f"qubesshm: summary: {summary_line(snapshot(server.ledger, grants, server.lifetimes))}",
          file=sys.stderr)


async def _serve(args: argparse.Namespace, protocol: ProtocolTable,
                 options: RelayOptions, grants: GrantHalves, loop_name: str) -> int:
    server = _start(args, protocol, options, args.socket, grants)
    # serve always says where it is; run (whose command shares the terminal) with -v.
    print(f"qubesshm: {_where(server, grants, loop_name)}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        await server.settle(args.late_timeout)
    finally:
        server.close()
        _summary(server, grants)
    return 0


async def _exited(child: subprocess.Popen[bytes]) -> int:
    """The child's exit status (-N for signal N), waited for on the loop through a
    pidfd, which asyncio's loop and uvloop both poll."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(child.pid)
    done = loop.create_future()
    def readable() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await done
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
    return child.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@contextlib.contextmanager
def _foreground(pgid: int) -> Iterator[None]:
    """Make ``pgid`` the terminal's foreground job while it runs, as a shell does,
    so it can read the terminal and Ctrl-C goes to it."""
    try:
        tty = os.open("/dev/tty", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        yield  # no controlling terminal: nothing to hand over
        return
    try:
        if os.tcgetpgrp(tty) != os.getpgrp():
            yield  # we are not the foreground job ourselves
            return
        # A background group may only take the terminal with SIGTTOU ignored.
        previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
        try:
            os.tcsetpgrp(tty, pgid)
            # If it touched the terminal before it owned it, it is stopped now.
            _signal_group(pgid, signal.SIGCONT)
            try:
                yield
            finally:
                os.tcsetpgrp(tty, os.getpgrp())
        finally:
            signal.signal(signal.SIGTTOU, previous)
    finally:
        os.close(tty)


async def _run(args: argparse.Namespace, protocol: ProtocolTable, options: RelayOptions,
               cmd: list[str], grants: GrantHalves, loop_name: str) -> int:
    socket_name = args.socket or f"qubesshm-run-{os.getpid()}"
    server = _start(args, protocol, options, socket_name, grants)
    log.info("%s", _where(server, grants, loop_name))
    env = dict(os.environ)
    env["WAYLAND_DISPLAY"] = str(server.listener.path)
    env.pop("WAYLAND_SOCKET", None)
    try:
        try:
            # The command gets a process group of its own, so a signal meant for
            # it arrives exactly once: from us, never also from a group-wide kill.
            # (Started with subprocess, not the loop's API: uvloop refuses
            # process_group.)
            child = subprocess.Popen(cmd, env=env, process_group=0)
        except OSError as exc:
            print(f"qubesshm run: cannot start {cmd[0]}: {exc}", file=sys.stderr)
            return 127
        with _foreground(child.pid):
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(sig, _signal_group, child.pid, sig)
            status = await _exited(child)
        server.drain_clients()
        await server.settle(args.late_timeout)
    finally:
        server.close()
        if not args.quiet:
            _summary(server, grants)
        written = _report(args, server, grants)
    # Shells report a death by signal N as 128+N.
    status = status if status >= 0 else 128 - status
    if server.ended_count:
        # Said when it happened too, but an app that then exits 0 (weston-terminal does)
        # would leave the user with a window that flashed and vanished, and no reason.
        for line in server.ended_clients:
            print(f"qubesshm run: qubesshm ended {line}", file=sys.stderr)
        if server.ended_count > len(server.ended_clients):
            print(f"qubesshm run: qubesshm ended {server.ended_count} clients in all (the "
                  f"last {len(server.ended_clients)} above)", file=sys.stderr)
        return status or 1
    return status if written else status or 1
