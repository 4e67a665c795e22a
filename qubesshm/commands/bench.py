"""``qubesshm bench relay|frames|churn|input``: qubesshm measured against baselines."""

from __future__ import annotations

import argparse
import sys

from .. import options
from ..bench.churn import POLICIES as CHURN_POLICIES
from ..bench.churn import run_churn_bench
from . import common

NAME = "bench"
HELP = "measure qubesshm against baselines"


def _add_bench_upstream(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upstream", metavar="NAME|PATH",
                        help="compositor to measure against (default: a headless Weston "
                        "started for the run, whatever $WAYLAND_DISPLAY names)")
    parser.add_argument("--animations", choices=("on", "off"), default=None,
                        help="the started Weston's desktop shell: on, as shipped (a close "
                        "animation keeps a closed window's last buffer about a second; the "
                        "default), or off")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    bench_sub = parser.add_subparsers(dest="bench", required=True)
    relay = common.add_subcommand(bench_sub, "relay",
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
    relay.add_argument("--placement", choices=("one-cpu", "free"), default="one-cpu",
                       help="one-cpu: the client, the relays and the Weston the bench "
                       "started run on one CPU, so that no path's wake-ups cross CPUs "
                       "(default); free: where the scheduler puts them")
    relay.add_argument("--no-waypipe", action="store_true", help="skip the waypipe baseline")
    relay.add_argument("--remote", action="store_true",
                       help="also the split proxy ('qubesshm split': serve --remote starting "
                       "qubesshm host, the stream over their pipes), with its ratios to "
                       "waypipe and to the unsplit proxy")
    common.add_event_loop_option(
        relay, help="the event loop of the qubesshm under test (default %(default)s)")
    frames = common.add_subcommand(
        bench_sub, "frames",
        help="frame rate and copy cost of 1920x1080 frames: direct, qubesshm, waypipe; or "
        "direct and qubesshm agent (--mode agent)")
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
    frames.add_argument("--json", type=options.output_file, metavar="FILE",
                        help="also write every run's figures here")
    frames.add_argument("--unsealed", action="store_true",
                        help="the client leaves its pool unsealed, so qubesshm reads it with "
                        "preadv rather than mapping it")
    frames.add_argument("--no-waypipe", action="store_true", help="skip the waypipe baseline")
    frames.add_argument("--size", type=options.window_size, default="1920x1080", metavar="WxH",
                        help="frame size (default %(default)s)")
    frames.add_argument("--mode", choices=("proxy", "agent"), default="proxy",
                        help="proxy: full, static and moving damage direct, through qubesshm "
                        "serve and waypipe (the default); agent: full damage direct and "
                        "through qubesshm agent + qubesshm guid-emulator on a private Xvfb "
                        "(needs Xvfb), with the agent's CPU per frame against a plain copy")
    frames.add_argument("--refresh", type=options.refresh_rate, default=None, metavar="HZ",
                        help="--mode agent: the agent's frame callbacks per second (default "
                        "60)")
    frames.add_argument("--remote", action="store_true",
                        help="also the split proxy ('qubesshm split': serve --remote starting "
                        "qubesshm host), and the bytes over the stream per frame of it and of "
                        "waypipe (its client-server socket), each counted by a pass-through "
                        "on the stream")
    churn = common.add_subcommand(
        bench_sub, "churn",
        help="window churn under each reclaim policy, and through qubesshm agent to the "
        "GUI-daemon emulator (policy agent): windows/s, live and deferred grants, ACKs")
    _add_bench_upstream(churn)
    churn.add_argument("--rate", type=options.rate, default=None,
                       help="windows opened a second (default 10)")
    churn.add_argument("--seconds", type=options.seconds, default=None,
                       help="how long windows are opened (default 10)")
    churn.add_argument("--size", type=options.window_size, default=None, metavar="WxH",
                       help="window size (default 1280x720; 400x300 with --unpaced)")
    churn.add_argument("--concurrency", type=options.positive, default=1,
                       help="windows open at once (default %(default)s)")
    churn.add_argument("--frames", type=options.positive, default=1,
                       help="frames drawn in each window (default %(default)s)")
    churn.add_argument("--hold", type=options.non_negative_seconds, default=0.0, metavar="S",
                       help="the GUI domain keeps each area mapped S s after it is let go "
                       "(proxy policies: qubesshm serve --sim-hold; agent: the emulator's "
                       "--hold; default 0: the compositor's or daemon's own release)")
    churn.add_argument("--ack-delay", type=options.non_negative_seconds, default=0.0,
                       metavar="S", help="agent policy: the emulator writes each "
                       "WINDOW_DUMP_ACK S s late, a late daemon (its --ack-delay; default 0)")
    churn.add_argument("--late-timeout", type=options.seconds, default=2.0, metavar="S",
                       help="how long qubesshm (serve and agent) waits for a let-go area's "
                       "release (its unmap notify; the daemon's ACK order) before its grants "
                       "go to deferred reclaim (default %(default)s)")
    churn.add_argument("--policies", default=None,
                       help="comma-separated, from " + ", ".join(CHURN_POLICIES)
                       + "; agent runs qubesshm agent with qubesshm guid-emulator as its GUI "
                       "domain on a private Xvfb (default: all; agent left out, with a note, "
                       "where Xvfb is not installed)")
    churn.add_argument("--drain-wait", type=options.non_negative_seconds, default=5.0, metavar="S",
                       help="how long to watch the backlog drain after the last close "
                       "before estimating the rest (default %(default)s)")
    churn.add_argument("--unpaced", action="store_true",
                       help="no frame pacing: each window drawn once and closed after one "
                       "wl_display.sync round trip, as fast as they go (not --rate/--seconds "
                       "but --windows), in --repeats interleaved runs with the medians; "
                       "policies recycle, agent and direct unless --policies")
    churn.add_argument("--windows", type=options.positive, default=None, metavar="N",
                       help="windows per run with --unpaced (default 300)")
    churn.add_argument("--block", type=options.windows_a_turn, default=None, metavar="N",
                       help="with --unpaced: every path of a run started at once and one "
                       "client taking turns of N windows between them, each path timed "
                       "apart, so that what the machine does meanwhile falls on all alike "
                       "(default 25); 0: one path after the other, each with its own "
                       "client (the compositor's CPU then counted for each)")
    churn.add_argument("--repeats", type=options.positive, default=None, metavar="N",
                       help="runs of every policy, interleaved, and their medians (default "
                       "3 with --unpaced, else 1)")
    churn.add_argument("--remote", action="store_true",
                       help="also each proxy policy chosen through the split proxy (serve "
                       "--remote starting qubesshm host; the row 'POLICY split', its figures "
                       "from the VM side's stats)")
    churn.add_argument("--json", type=options.output_file, metavar="FILE",
                       help="write the results as JSON")
    churn.add_argument("--plot", type=options.output_file, metavar="FILE",
                       help="plot live grants and deferred backlog over time (PNG; with the "
                       "agent policy also the ACKs the GUI daemon owes)")
    keys = common.add_subcommand(
        bench_sub, "input",
        help="key press latency, XTest to the client's wl_keyboard.key: through qubesshm "
        "agent + qubesshm guid-emulator against Weston's x11 backend (each on a private "
        "Xvfb; needs Xvfb and weston)")
    keys.add_argument("--presses", type=options.positive, default=50,
                      help="key presses per path (default %(default)s)")
    keys.add_argument("--gap", type=options.non_negative_seconds, default=0.02, metavar="S",
                      help="pause after each round of presses (default %(default)s)")
    keys.add_argument("--timeout", type=options.seconds, default=5.0, metavar="S",
                      help="how long a press may take to reach the client before that path "
                      "counts it missing (default %(default)s)")
    keys.add_argument("--json", type=options.output_file, metavar="FILE",
                      help="also write every latency here")


def check(args: argparse.Namespace) -> str | None:
    if getattr(args, "animations", None) is not None and args.upstream is not None:
        raise common.UsageError(
            "--animations sets up the Weston the benchmark starts; the compositor given "
            "with --upstream runs as it was started")
    if args.bench == "frames":
        from ..bench.frames import check_frames
        return check_frames(args)
    if args.bench == "churn":
        from ..bench.churn import check_churn
        return check_churn(args)
    return None


def main(args: argparse.Namespace) -> int:
    try:
        if args.bench == "frames":
            from ..bench.frames import run_frames_bench
            return run_frames_bench(args)
        if args.bench == "churn":
            return run_churn_bench(args)
        if args.bench == "input":
            from ..bench.input import run_input_bench
            return run_input_bench(args)
        from ..bench.relay import run_relay_bench
        return run_relay_bench(args)
    except (RuntimeError, OSError) as exc:
        print(f"qubesshm bench {args.bench}: {exc}", file=sys.stderr)
        return 1
