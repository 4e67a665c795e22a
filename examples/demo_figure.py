"""The demo's pictures: what qubesshm did for two apps, told at a glance.

``examples/demo.py`` runs the apps twice and collects what this module draws for
each run: the run's report (``qubesshm run --report-json``), qubesshm's deferred
list sampled while it ran (:class:`Measured`) and a screenshot: of the headless
compositor in proxy mode, of the emulated GUI daemon's X screen in agent mode
(:data:`PROXY` and :data:`AGENT` hold what the two pictures say differently). Here
are the pieces of a picture, each usable alone (the tests check them one by one):

- :func:`headline`, one sentence made from the figures: qubesshm's deferred list
  against what an agent without unmap notify (proxy mode), or today's GUI agents
  (agent mode), would have left on a stock kernel's;
- :func:`modelled_lists`, that agent's deferred list second by second on each kernel
  (``qubesshm.report.deferred_list_by_second``, the report's own model);
- :func:`find_windows`, the apps' windows on the screenshot, found by their pixels
  (both clients draw ``examples/pattern_client.py``'s test pattern, at their sizes);
- :data:`GLOSSARY` (and :data:`AGENT_GLOSSARY`), the jargon in plain words;
- :func:`build_figure`, all of it on one matplotlib Figure.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
from pattern_client import DEFAULT_HEIGHT, DEFAULT_WIDTH, pattern_pixels

from qubesshm.grants.api import PAGE_SIZE
from qubesshm.grants.params import KERNELS
from qubesshm.report import deferred_list_by_second

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RGB = npt.NDArray[np.uint8]
VerticalAlignment = Literal["bottom", "top"]

# The window sizes of the two clients as the demo starts them.
PATTERN_SIZE = (DEFAULT_WIDTH, DEFAULT_HEIGHT)
CHURN_SIZE = (400, 300)
# The kernel the headline compares with: Linux's defaults, what a qube runs unless
# Qubes' own settings apply.
HEADLINE_KERNEL = "stock"
# How far past the run the modelled lists are drawn at most, in seconds.
MODEL_CAP_SECONDS = 3600

_STOCK, _QUBES = KERNELS["stock"], KERNELS["qubes"]
GLOSSARY: tuple[tuple[str, str], ...] = (
    ("grant page", "a 4 KiB page of the qube's memory that it shares with the GUI "
     "domain, where the compositor shows it; every window's pixels travel in them."),
    ("gntalloc limit", "how many grant pages a qube may share at once: "
     f"{_STOCK.gntalloc_limit:,} ({_STOCK.gntalloc_limit * PAGE_SIZE >> 20} MiB) on a "
     "stock kernel, less than one full-HD window; Qubes raises it."),
    ("deferred list", "where the kernel parks a grant that was ended while the compositor "
     f"still showed it; it goes through only a few a second ({_STOCK.free_per_iteration:,} "
     f"on a stock kernel, {_QUBES.free_per_iteration:,} with Qubes' setting), and until "
     "then those pages are lost to the qube."),
    ("unmap notify", "a signal the GUI domain gives when it stops showing a page; qubesshm "
     "ends a grant only after it, so nothing needs parking. A GUI agent (the qube's side "
     "of the window sharing) without it ends grants when the app frees a buffer, shown or "
     "not."),
)
# Agent mode: qubesshm is the GUI agent, and the GUI domain's daemon shows the windows.
AGENT_GLOSSARY: tuple[tuple[str, str], ...] = (
    ("grant page", "a 4 KiB page of the qube's memory that it shares with the GUI "
     "domain, whose GUI daemon shows it on the screen; every window's pixels travel in "
     "them."),
    GLOSSARY[1],
    ("deferred list", "where the kernel parks a grant that was ended while the GUI daemon "
     "still mapped it; it goes through only a few a second "
     f"({_STOCK.free_per_iteration:,} on a stock kernel, {_QUBES.free_per_iteration:,} "
     "with Qubes' setting), and until then those pages are lost to the qube."),
    ("dump, ACK", "a window's grant pages go to the daemon as a dump; the daemon answers "
     "each dump with an ACK, in order, once its X server has caught up, so the ACK of a "
     "dump sent after a window let go of its old pages shows that the daemon no longer "
     "maps them. qubesshm ends or reuses those pages only then, so nothing needs parking; "
     "today's GUI agents (the qube's side of the window sharing) end them at once."),
)


@dataclass(frozen=True)
class Mode:
    """What the picture of a run says in words that depend on how qubesshm ran."""

    name: str  # "proxy" or "agent"
    lead: str  # before "qubesshm ..." in the headline
    others: str  # who qubesshm is compared with, in the headline
    others_legend: str  # the same, in the plot's legend
    others_tag: str  # beside the kernel's name, on the line left to drain after the run
    none_deferred: str  # why they would have deferred nothing
    screen_title: str
    churn_gone: str  # how a churn window leaves the screen
    glossary: tuple[tuple[str, str], ...]


PROXY = Mode(
    name="proxy", lead="", others="an agent without unmap notify",
    others_legend="an agent without unmap notify", others_tag="no unmap notify",
    none_deferred="the compositor let go of every buffer before the apps freed it",
    screen_title="the compositor's screen mid-run (the apps' pixels came through qubesshm)",
    churn_gone="then closes with a fade", glossary=GLOSSARY)
AGENT = Mode(
    name="agent", lead="As the GUI agent, ",
    others="today's GUI agents, which end a window's grants as soon as it lets go of them,",
    others_legend="today's GUI agents",
    others_tag="today's agents",
    none_deferred="no window let go of pages the daemon still mapped",
    screen_title="the emulated GUI daemon's X screen mid-run (windows drawn from qubesshm's "
                 "grant pages)",
    churn_gone="then closes", glossary=AGENT_GLOSSARY)

COLOURS = {
    "qubesshm": "#1b7f3b",
    "stock": "#c0392b",
    "qubes": "#2f6db5",
    "pattern": "#8e24aa",
    "churn": "#e67e00",
}


# -- what was measured ---------------------------------------------------------------


@dataclass
class Measured:
    """qubesshm's grant pages over the run, read from its control socket.

    ``t`` is seconds since the proxy started (the report's clock, so the samples line
    up with the model's seconds), ``deferred`` the pages on the kernel's deferred list,
    ``live`` the grant pages shared; ``peak_backlog`` the most pages the proxy itself
    saw on the deferred list (it looks at every kernel tick), ``None`` unread.
    """

    t: list[float] = field(default_factory=list)
    deferred: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    peak_backlog: int | None = None

    def add(self, stats: dict[str, Any], fallback_t: float) -> None:
        """One sample from ``qubesshm.relay.control.read_stats``."""
        lifetimes = stats.get("lifetimes") or {}
        self.t.append(float(lifetimes.get("seconds", fallback_t)))
        grants = stats["grants"]
        self.deferred.append(int(grants.get("deferred") or 0))
        self.live.append(int(grants.get("live") or 0))
        if lifetimes.get("peak_deferred_backlog") is not None:
            self.peak_backlog = max(self.peak_backlog or 0,
                                    int(lifetimes["peak_deferred_backlog"]))

    def peak(self, at_exit: int) -> int:
        """The most pages qubesshm had on the deferred list, by any account."""
        return max([at_exit, self.peak_backlog or 0, *self.deferred])

    def as_json(self) -> dict[str, Any]:
        return {"t": self.t, "deferred": self.deferred, "live": self.live,
                "peak_backlog": self.peak_backlog}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measured:
        return cls(list(data["t"]), list(data["deferred"]), list(data["live"]),
                   data.get("peak_backlog"))


# -- the figures -----------------------------------------------------------------------


def _pages(n: int) -> str:
    return f"{n:,} page" + ("" if n == 1 else "s")


def headline_kernel(report: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The kernel the headline speaks of: the stock one when the report has it."""
    kernels: dict[str, dict[str, Any]] = report["kernels"]
    name = HEADLINE_KERNEL if HEADLINE_KERNEL in kernels else next(iter(kernels))
    return name, kernels[name]


def headline(report: dict[str, Any], measured: Measured, mode: Mode = PROXY) -> str:
    """One sentence: qubesshm's deferred list, and the modelled agent's (one without
    unmap notify in proxy mode, today's GUI agents in agent mode)."""
    at_exit = int(report["grant_pages_deferred"] or 0)
    peak = measured.peak(at_exit)
    apps = report["clients"]
    run = f"{report['seconds']:.1f} s of {apps} app{'' if apps == 1 else 's'}"
    if peak == 0 and not measured.t:
        # Not sampled while it ran: only the report's figure at exit is known.
        ours = f"qubesshm left 0 pages on the deferred list after {run}"
    elif peak == 0:
        ours = f"qubesshm kept the deferred list at 0 pages through {run}"
    else:
        ours = (f"qubesshm had at most {_pages(peak)} on the deferred list ({at_exit:,} at "
                f"exit) through {run}")
    name, kernel = headline_kernel(report)
    agent, where = mode.others, f"on a {name} kernel"
    if kernel["agent_deferred_pages"] == 0:
        either = " either" if peak == 0 else ""
        theirs = f"{agent} would have deferred none{either} {where}: {mode.none_deferred}"
    elif kernel["agent_backlog_at_exit"]:
        theirs = (f"{agent} would have left {_pages(kernel['agent_backlog_at_exit'])} there "
                  f"at exit {where}, draining for {kernel['agent_drain_seconds']:,} s more")
    else:
        theirs = (f"{agent} would have put {_pages(kernel['agent_deferred_pages'])} there "
                  f"{where} (up to {kernel['agent_peak_backlog']:,} at once), all gone by "
                  "the end of the run")
    return f"{mode.lead}{ours}; {theirs}."


def modelled_lists(report: dict[str, Any]) -> dict[str, list[int]]:
    """Per kernel, the modelled agent's deferred list during each second of the run and
    after it (see ``qubesshm.report.deferred_list_by_second``)."""
    added = {int(s): int(n) for s, n in
             (report.get("pages_retired_while_held_by_second") or {}).items()}
    return {name: deferred_list_by_second(added, kernel["free_per_iteration"],
                                          report["seconds"], cap_seconds=MODEL_CAP_SECONDS)
            for name, kernel in report["kernels"].items()}


def key_figures(report: dict[str, Any], daemon: dict[str, float] | None = None) -> list[str]:
    """The run in three lines, for under the screenshot; a fourth for the GUI daemon's
    side in agent mode (``daemon``: ``demo_agent.daemon_figures``)."""
    apps = report["clients"]
    names = {"stock": "a stock kernel's", "qubes": "Qubes'"}
    limits = " and ".join(
        f"{'fits' if kernel['fits_gntalloc_limit'] else 'EXCEEDS'} "
        f"{names.get(name, f'the {name} kernel')} {kernel['gntalloc_limit']:,}"
        for name, kernel in report["kernels"].items())
    return [
        f"The run: {apps} app{'' if apps == 1 else 's'} for {report['seconds']:.1f} s, "
        f"{report['commits']:,} frames, {report['bytes_copied'] / (1 << 20):.1f} MiB of "
        "pixels copied into grant pages.",
        f"Grant pages: {report['grant_pages_shared']:,} shared in all, at most "
        f"{report['peak_grant_pages']:,} at once, {report['grant_pages_leaked']:,} leaked.",
        f"gntalloc limit needed: {_pages(report['pages_needed'])}; {limits}.",
        *([] if daemon is None else [_daemon_line(daemon)]),
    ]


def _daemon_line(daemon: dict[str, float]) -> str:
    windows, acks = int(daemon["windows"]), int(daemon["acks"])
    latency = f" after {daemon['ack_p50_ms']:.1f} ms (median)" if "ack_p50_ms" in daemon else ""
    return (f"The GUI daemon (emulated): {windows:,} window{'' if windows == 1 else 's'}, "
            f"{int(daemon['dumps']):,} dumps (+{int(daemon['barriers']):,} barriers), "
            f"{acks:,} ACK{'' if acks == 1 else 's'}{latency}.")


# -- the windows on the screenshot -------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A client's window found on a screenshot.

    ``matched`` pixels are exactly the client's; ``visible`` is how many of the
    window's pixels are on screen and not under another window found. A window
    whose visible pixels all match is shown undimmed (``clean``).
    """

    client: str  # "pattern" or "churn"
    x: int
    y: int
    width: int
    height: int
    matched: int
    visible: int

    @property
    def clean(self) -> bool:
        return self.matched > 0 and self.matched == self.visible

    @property
    def shown(self) -> float:
        """The share of the window one can see."""
        return self.visible / (self.width * self.height)


@functools.cache
def expected_rgb(width: int, height: int) -> RGB:
    """The pattern client's pixels as a screenshot shows them: height x width x RGB."""
    bgrx = np.frombuffer(pattern_pixels(width, height), dtype=np.uint8)
    rgb: RGB = bgrx.reshape(height, width, 4)[:, :, 2::-1].copy()
    rgb.flags.writeable = False
    return rgb


def read_rgb(png: Path) -> RGB:
    """A screenshot as height x width x RGB bytes."""
    from matplotlib import image

    pixels = np.asarray(image.imread(str(png)))
    if pixels.dtype != np.uint8:
        pixels = np.rint(pixels * 255)
    rgb: RGB = pixels[:, :, :3].astype(np.uint8)
    return rgb


def _packed(rgb: RGB) -> npt.NDArray[np.uint32]:
    """Each pixel as one number, to compare pixels at one go."""
    rgbx = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    rgbx[..., :3] = rgb
    packed: npt.NDArray[np.uint32] = rgbx.view(np.uint32)[..., 0]
    return packed


def _find_patch(screen: npt.NDArray[np.uint32],
                patch: npt.NDArray[np.uint32]) -> list[tuple[int, int]]:
    """Every (x, y) where ``patch`` appears in ``screen`` exactly."""
    ph, pw = patch.shape
    sh, sw = screen.shape
    if ph > sh or pw > sw:
        return []
    ys, xs = np.nonzero(screen[: sh - ph + 1, : sw - pw + 1] == patch[0, 0])
    for dy in range(ph):
        for dx in range(pw):
            keep = screen[ys + dy, xs + dx] == patch[dy, dx]
            ys, xs = ys[keep], xs[keep]
    return [(int(x), int(y)) for x, y in zip(xs, ys, strict=True)]


def find_windows(screen: RGB, sizes: dict[str, tuple[int, int]] | None = None,
                 corner: int = 8, least: float = 0.02) -> list[Window]:
    """The clients' windows on a screenshot, by their exact pixels.

    Each client draws the test pattern at its size (``sizes``, default the demo's);
    a window is found by any of its four ``corner`` x ``corner`` corners, so one
    partly under another window is found too when a corner shows. At least ``least``
    of its pixels must match; a pixel counts for one window only (the best-matching
    first: both clients' top-left corners look alike). Dimmed pixels (a fade) do not
    match, so a window fading in or out is not found.
    """
    sizes = sizes or {"pattern": PATTERN_SIZE, "churn": CHURN_SIZE}
    packed = _packed(screen)
    sh, sw = packed.shape
    scored: list[tuple[int, str, int, int, npt.NDArray[np.bool_]]] = []
    for client, (width, height) in sizes.items():
        expected = _packed(expected_rgb(width, height))
        k = min(corner, width, height)
        starts: set[tuple[int, int]] = set()
        for cx, cy in ((0, 0), (width - k, 0), (0, height - k), (width - k, height - k)):
            for x, y in _find_patch(packed, expected[cy:cy + k, cx:cx + k]):
                starts.add((x - cx, y - cy))
        for x, y in starts:
            match = np.zeros((sh, sw), dtype=bool)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, sw), min(y + height, sh)
            match[y0:y1, x0:x1] = (packed[y0:y1, x0:x1]
                                   == expected[y0 - y:y1 - y, x0 - x:x1 - x])
            scored.append((int(match.sum()), client, x, y, match))
    claimed = np.zeros((sh, sw), dtype=bool)
    kept: list[tuple[str, int, int, int]] = []
    for matched, client, x, y, match in sorted(scored, key=lambda s: -s[0]):
        width, height = sizes[client]
        fresh = int((match & ~claimed).sum())
        if fresh < least * width * height or fresh < matched / 2:
            continue
        claimed |= match
        kept.append((client, x, y, fresh))
    windows = []
    for client, x, y, matched in kept:
        width, height = sizes[client]
        on_screen = np.zeros((sh, sw), dtype=bool)
        on_screen[max(y, 0):min(y + height, sh), max(x, 0):min(x + width, sw)] = True
        if client != "churn":
            # The churn client's windows open after the others and so lie above them.
            for other, ox, oy, _ in kept:
                if other == "churn":
                    ow, oh = sizes[other]
                    on_screen[max(oy, 0):max(oy + oh, 0), max(ox, 0):max(ox + ow, 0)] = False
        windows.append(Window(client, x, y, width, height, matched, int(on_screen.sum())))
    return sorted(windows, key=lambda w: (w.client != "pattern", w.y, w.x))


def shot_quality(windows: Sequence[Window]) -> tuple[bool, bool, float, int]:
    """How good a screenshot is for the demo, to compare shots: the pattern client's
    window undimmed, a churn window undimmed beside it, as much of the pattern shown
    as can be, the more churn windows the better."""
    patterns = [w for w in windows if w.client == "pattern"]
    churn = [w for w in windows if w.client == "churn"]
    pattern_clean = any(w.clean for w in patterns)
    return (pattern_clean, any(w.clean for w in churn),
            max((w.shown for w in patterns if w.clean), default=0.0), len(churn))


def is_best_shot(windows: Sequence[Window]) -> bool:
    """The pattern whole and undimmed, and an undimmed churn window: no need to look on."""
    pattern_clean, churn_clean, shown, _ = shot_quality(windows)
    return pattern_clean and churn_clean and shown == 1.0


# -- the figure ----------------------------------------------------------------------------

# Sizes of the text, in points.
HEADLINE_SIZE = 18
TEXT_SIZE = 12
SMALL_SIZE = 11


def _boxes_overlap(a: tuple[float, float, float, float],
                   b: tuple[float, float, float, float]) -> float:
    """The area two (x0, y0, x1, y1) boxes share."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def _label_windows(axes: Axes, windows: Sequence[Window], screen_shape: tuple[int, ...],
                   seconds: float, churn_windows: int, mode: Mode = PROXY) -> None:
    """A box around each window found and a label beside it, placed where it covers
    no other label and as little of the other windows as can be."""
    from matplotlib.patches import Rectangle

    height, width = screen_shape[:2]
    axes.set_xlim(-4, width + 4)
    axes.set_ylim(height + 4, -4)
    names = {
        "pattern": f"pattern client: one window, animating {seconds:g} s",
        "churn": f"churn client: one of the {churn_windows} windows it opens and closes",
    }
    to_data = axes.transData.inverted()
    placed: list[tuple[float, float, float, float]] = []
    for window in windows:
        colour = COLOURS[window.client]
        axes.add_patch(Rectangle((window.x - 2.5, window.y - 2.5), window.width + 4,
                                 window.height + 4, fill=False, edgecolor=colour,
                                 linewidth=3, gid=f"box-{window.client}"))
        text = names[window.client]
        if window.shown < 1.0:
            under = " (the rest under a churn window)" if window.client == "pattern" else ""
            text += f"\n{window.shown:.0%} of it in view{under}"
        label = axes.text(0, 0, text, fontsize=TEXT_SIZE, color="white", fontweight="bold",
                          ha="center", gid=f"label-{window.client}", zorder=6,
                          bbox={"boxstyle": "round,pad=0.3", "facecolor": colour,
                                "edgecolor": "none", "alpha": 0.93})
        centre = window.x + window.width / 2
        others = [(w.x, w.y, w.x + w.width, w.y + w.height) for w in windows if w != window]
        best: tuple[float, float, float, VerticalAlignment] | None = None
        # Above the window, below it, or inside its top or bottom edge.
        spots: tuple[tuple[float, VerticalAlignment], ...] = (
            (window.y - 8.0, "bottom"), (window.y + window.height + 8.0, "top"),
            (window.y + 8.0, "top"), (window.y + window.height - 8.0, "bottom"))
        for y, va in spots:
            label.set_position((centre, y))
            label.set_verticalalignment(va)
            # The text and the box around it (its pad), in screen pixels.
            corners = to_data.transform(
                label.get_window_extent().padded(7).get_points())
            x0, x1 = sorted(corners[:, 0])
            y0, y1 = sorted(corners[:, 1])
            shift = max(0.0, -x0) - max(0.0, x1 - width)  # kept within the screen
            box = (x0 + shift, y0, x1 + shift, y1)
            cost = (1e9 * (y0 < 0 or y1 > height)
                    + 1e6 * sum(_boxes_overlap(box, p) for p in placed)
                    + sum(_boxes_overlap(box, o) for o in others))
            if best is None or cost < best[0]:
                best = (cost, centre + shift, y, va)
        assert best is not None
        _, x, y, va = best
        label.set_position((x, y))
        label.set_verticalalignment(va)
        corners = to_data.transform(label.get_window_extent().padded(7).get_points())
        placed.append((*corners.min(axis=0), *corners.max(axis=0)))
    missing = []
    if not any(w.client == "pattern" for w in windows):
        missing.append("the pattern client's window is not in view in this shot")
    if not any(w.client == "churn" for w in windows):
        missing.append("no churn window in view at this moment: each shows for a moment, "
                       f"{mode.churn_gone}")
    if missing:
        axes.text(0.5, 0.03, "\n".join(missing), transform=axes.transAxes, ha="center",
                  va="bottom", fontsize=SMALL_SIZE, color="white", gid="label-missing",
                  bbox={"boxstyle": "round,pad=0.3", "facecolor": "#333333",
                        "edgecolor": "none", "alpha": 0.88})


def _story(report: dict[str, Any], name: str, sizes: Sequence[int]) -> str:
    """What the modelled list did on one kernel, for the plot's legend."""
    kernel = report["kernels"][name]
    if kernel["agent_deferred_pages"] == 0:
        return "empty all along"
    if not kernel["agent_backlog_at_exit"]:
        return f"up to {_pages(kernel['agent_peak_backlog'])}, empty by the end of the run"
    drain = kernel["agent_drain_seconds"]
    end = max(math.ceil(report["seconds"]),
              *(int(s) + 1 for s in report.get("pages_retired_while_held_by_second") or {}))
    cut = "" if len(sizes) - 1 == end + drain else f" (drawn for {MODEL_CAP_SECONDS:,} s)"
    return (f"up to {_pages(kernel['agent_peak_backlog'])}, "
            f"{kernel['agent_backlog_at_exit']:,} at exit, empty {drain:,} s later{cut}")


def _plot_lists(figure: Figure, box: tuple[float, float, float, float],
                report: dict[str, Any], measured: Measured,
                lists: dict[str, list[int]], mode: Mode = PROXY) -> list[Axes]:
    """The deferred list over the run in ``box`` (left, bottom, right, top): qubesshm's,
    measured, and the modelled agent's on each kernel; a second panel, on its own time
    scale, for what is left to drain after the run. Returns the panels."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator

    left, bottom, right, top = box
    at_exit = int(report["grant_pages_deferred"] or 0)
    end = max(math.ceil(report["seconds"]), 1)
    longest = max((len(sizes) for sizes in lists.values()), default=end + 1)
    tail = longest - 1 > end
    if tail:
        split = left + (right - left) * 0.58
        run_axes = figure.add_axes((left, bottom, split - 0.006 - left, top - bottom))
        after_axes = figure.add_axes((split + 0.006, bottom, right - split - 0.006,
                                      top - bottom), sharey=run_axes)
        panels = [run_axes, after_axes]
    else:
        run_axes = figure.add_axes((left, bottom, right - left, top - bottom))
        panels = [run_axes]
    highest = max([1, at_exit, *measured.deferred, *(max(s) for s in lists.values() if s)])
    handles: list[Line2D] = []
    styles = {"stock": (0, (6, 2)), "qubes": (0, (2, 1.5))}
    names = {"stock": "stock", "qubes": "Qubes"}
    for name, sizes in lists.items():
        rate = report["kernels"][name]["free_per_iteration"]
        label = (f"{mode.others_legend}, {names.get(name, name)} kernel (frees "
                 f"{rate:,} a second), modelled:\n{_story(report, name, sizes)}")
        xs, ys = [*range(len(sizes)), len(sizes)], [*sizes, sizes[-1]]
        style: dict[str, Any] = {"color": COLOURS.get(name, "grey"), "linewidth": 2.6,
                                 "linestyle": styles.get(name, "-"), "zorder": 5,
                                 "gid": f"line-{name}"}
        (line,) = run_axes.step(xs, ys, where="post", label=label, **style)
        handles.append(line)
        if tail and any(sizes[end:]):
            # What is left at the end of the run, draining.
            panels[1].step(xs[end:], ys[end:], where="post", **style)
            panels[1].annotate(f"{names.get(name, name)} kernel, {mode.others_tag}",
                               (end, sizes[end]), xytext=(8, 6), textcoords="offset points",
                               fontsize=SMALL_SIZE, color=style["color"], fontweight="bold",
                               va="bottom", gid=f"tag-{name}")
    peak = measured.peak(at_exit)
    if measured.t:
        ts, values = [*measured.t, report["seconds"]], [*measured.deferred, at_exit]
        (line,) = run_axes.step(ts, values, where="post", color=COLOURS["qubesshm"],
                                linewidth=4, zorder=4, gid="line-qubesshm",
                                label=f"qubesshm, measured every {SAMPLE_SECONDS:g} s:\n"
                                      + ("0 pages all along" if peak == 0 else
                                         f"at most {_pages(peak)}, {at_exit:,} at exit"))
        run_axes.annotate("qubesshm", (ts[0], values[0]), xytext=(6, 5),
                          textcoords="offset points", fontsize=SMALL_SIZE, va="bottom",
                          color=COLOURS["qubesshm"], fontweight="bold", gid="tag-qubesshm")
    else:
        (line,) = run_axes.plot([report["seconds"]], [at_exit], "o", markersize=9,
                                color=COLOURS["qubesshm"], zorder=5, gid="line-qubesshm",
                                label=f"qubesshm at exit (not sampled): {_pages(at_exit)}")
    handles.insert(0, line)
    formatter = FuncFormatter(lambda value, _: f"{value:,.0f}")
    for axes in panels:
        axes.set_yscale("symlog", linthresh=1, linscale=0.6)
        axes.yaxis.set_major_locator(SymmetricalLogLocator(base=10, linthresh=1))
        axes.yaxis.set_major_formatter(formatter)
        axes.set_ylim(-0.3, max(10, highest * 8))
        axes.grid(True, which="major", alpha=0.3)
        axes.tick_params(labelsize=SMALL_SIZE)
    run_axes.set_xlim(0, end)
    run_axes.set_ylabel("pages on the deferred list\n(log scale; lower is better)",
                        fontsize=TEXT_SIZE)
    run_axes.set_title(f"the deferred list during the run ({report['seconds']:.1f} s)",
                       fontsize=TEXT_SIZE)
    run_axes.set_xlabel("seconds since qubesshm started", fontsize=TEXT_SIZE)
    if tail:
        after_axes = panels[1]
        after_axes.set_xlim(end, longest)
        after_axes.set_title("and after it", fontsize=TEXT_SIZE)
        after_axes.set_xlabel("seconds (a longer scale)", fontsize=TEXT_SIZE)
        after_axes.tick_params(labelleft=False, left=False)
        run_axes.spines["right"].set_visible(False)
        after_axes.spines["left"].set_visible(False)
        # The break between the two time scales: a slash on each side, top and bottom.
        marks: dict[str, Any] = {"marker": [(-1, -1.5), (1, 1.5)], "markersize": 11,
                                 "linestyle": "none", "color": "k", "mec": "k", "mew": 1,
                                 "clip_on": False}
        run_axes.plot([1, 1], [0, 1], transform=run_axes.transAxes, **marks)
        after_axes.plot([0, 0], [0, 1], transform=after_axes.transAxes, **marks)
    figure.legend(handles=handles, loc="upper left", bbox_to_anchor=(left - 0.045, bottom - 0.075),
                  fontsize=SMALL_SIZE, frameon=False, borderaxespad=0, handlelength=3.2)
    return panels


# How often demo.py samples qubesshm's counters, in seconds (for the legend).
SAMPLE_SECONDS = 0.1


def build_figure(report: dict[str, Any], measured: Measured, screen: RGB | None,
                 windows: Sequence[Window], *, seconds: float = 5.0,
                 churn_windows: int = 8, mode: Mode = PROXY,
                 daemon: dict[str, float] | None = None) -> Figure:
    """The demo's picture: the headline over the screenshot (its windows labelled) and
    the plot of the deferred lists, the run's figures and the jargon underneath. Without
    a screenshot (a compositor of one's own) the plot takes the whole width. ``mode``
    words it for a proxy run or an agent run; ``daemon`` adds the GUI daemon's figures
    (``demo_agent.daemon_figures``) to the run's."""
    from matplotlib.figure import Figure

    width_in, height_in = (17.0, 10.0) if screen is not None else (12.0, 11.5)
    figure = Figure(figsize=(width_in, height_in), dpi=100, facecolor="white")

    def lines_high(count: int, size: float) -> float:
        """Figure height taken by ``count`` lines of ``size`` points."""
        return count * size * 1.4 / 72 / height_in

    chars = int(width_in * 72 / (HEADLINE_SIZE * 0.62))
    title = textwrap.wrap(headline(report, measured, mode), chars)
    figure.text(0.5, 0.985, "\n".join(title), ha="center", va="top",
                fontsize=HEADLINE_SIZE, fontweight="bold", gid="headline", linespacing=1.3)
    under_title = 0.985 - lines_high(len(title), HEADLINE_SIZE) - 0.03
    # The glossary at the bottom, across the whole width: the term, then its meaning.
    term_width = 0.115 if screen is not None else 0.18
    meaning_chars = int(width_in * (0.97 - term_width) * 72 / (TEXT_SIZE * 0.55))
    rows = [(term, textwrap.wrap(meaning, meaning_chars)) for term, meaning in mode.glossary]
    y = 0.02 + lines_high(sum(len(lines) for _, lines in rows), TEXT_SIZE)
    figure.text(0.02, y + 0.012, "In plain words", fontsize=TEXT_SIZE, fontweight="bold",
                va="bottom", color="#444444", gid="glossary")
    glossary_top = y + 0.012 + lines_high(1, TEXT_SIZE)
    for term, lines in rows:
        figure.text(0.02, y, term, fontsize=TEXT_SIZE, fontweight="bold", va="top",
                    gid=f"term-{term}")
        figure.text(0.02 + term_width, y, "\n".join(lines), fontsize=TEXT_SIZE, va="top",
                    gid=f"meaning-{term}", linespacing=1.25)
        y -= lines_high(len(lines), TEXT_SIZE)
    lists = modelled_lists(report)
    legend_high = lines_high(2 * (len(lists) + 1), SMALL_SIZE)
    plot_bottom = glossary_top + 0.035 + legend_high + 0.075
    # The run in a few words: under the screenshot, or under the plot's legend.
    figures = key_figures(report, daemon)
    figure.text(0.02, glossary_top + 0.03, "\n".join(figures),
                fontsize=SMALL_SIZE, va="bottom", gid="key-figures", linespacing=1.35)
    if screen is not None:
        key_top = glossary_top + 0.03 + lines_high(len(figures), SMALL_SIZE)
        screen_axes = figure.add_axes((0.015, key_top + 0.01, 0.48,
                                       under_title - 0.035 - key_top - 0.01))
        screen_axes.imshow(screen, interpolation="antialiased")
        screen_axes.set_axis_off()
        screen_axes.set_title(mode.screen_title, fontsize=TEXT_SIZE)
        _label_windows(screen_axes, windows, screen.shape, seconds, churn_windows, mode)
        plot_left = 0.565
    else:
        plot_left = 0.09
        plot_bottom += lines_high(len(figures), SMALL_SIZE) + 0.02
    _plot_lists(figure, (plot_left, plot_bottom, 0.985, under_title - 0.03), report, measured,
                lists, mode)
    return figure
