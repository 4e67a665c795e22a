"""The README's main command, ``examples/demo.py``, as a newcomer runs it (no compositor
running: it starts its own headless Weston for the proxy run, and its own Xvfb for the
agent run), and the pictures it saves, piece by piece (``examples/demo_figure.py``): the
headline's numbers, the plot's lines, the labels; and the agent part's own pieces
(``examples/demo_agent.py``): the private Xvfb, its screen read back, the daemon's
figures read from the agent's exit line."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image
from screenshots import example  # tests/ is on sys.path (pytest's rootdir-less "prepend" import)

from qubesshm.agent.main import agent_summary
from qubesshm.report import build_report, deferred_list_by_second, kernels_for

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"


def figure_module() -> ModuleType:
    """``examples/demo_figure.py`` (its sibling ``pattern_client`` loaded first)."""
    example("pattern_client")
    return example("demo_figure")


def numbers(text: str) -> list[float]:
    """The numbers in ``text``, as written (1,616 is one number)."""
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", text)]


def headline_numbers(report: dict[str, Any], measured: Any) -> list[float]:
    """The numbers the headline must give, in its order, from the report and samples:
    qubesshm's deferred pages (the most, and at exit unless both are 0), the run's
    seconds and apps, then the modelled agent's on the stock kernel."""
    at_exit = report["grant_pages_deferred"]
    peak = max([at_exit, measured.peak_backlog or 0, *measured.deferred])
    ours = [peak] if peak == 0 else [peak, at_exit]
    stock = report["kernels"]["stock"]
    if stock["agent_deferred_pages"] == 0:
        theirs = []
    elif stock["agent_backlog_at_exit"]:
        theirs = [stock["agent_backlog_at_exit"], stock["agent_drain_seconds"]]
    else:
        theirs = [stock["agent_deferred_pages"], stock["agent_peak_backlog"]]
    return [*ours, round(report["seconds"], 1), report["clients"], *theirs]


def run_stats(retired: dict[str, int], deferred: int = 0, seconds: float = 6.3,
              apps: int = 2) -> dict[str, Any]:
    """Counters of a run as the proxy gives them (``relay.control.snapshot``)."""
    return {
        "clients": 0, "clients_served": apps, "commits": 220, "bytes_damaged": 1 << 24,
        "bytes_copied": 1 << 24, "early_releases": 200, "client_pools": 9,
        "client_buffers": 10, "upstream_pools": 6, "upstream_buffers": 18,
        "commit_waits_ms": {"count": 0, "p50": None, "p99": None, "max": None},
        "waits_for_room": 0, "refills_in_place": 0, "orphans_timed_out": 0,
        "grants": {"peak_live": 624, "shared_total": 700, "deferred": deferred, "leaked": 0},
        "release_latency_ms": {"count": 20, "p50": 25.0, "p99": 25.5, "max": 25.6},
        "lifetimes": {"cache_hits": 12, "late_releases": 0, "refused": 0,
                      "peak_pages_wanted": 624,
                      "unmap_latency_ms": {"count": 6, "p50": 0.5, "p99": 2.0, "max": 2.0},
                      "retired_while_held": retired, "seconds": seconds},
    }


# Four stories a run can tell: the stock kernel's list left full at exit, drained within
# the run, never used; and qubesshm itself with pages on the list.
CASES = {
    "stock-left-at-exit": (run_stats({"0": 120, "1": 230, "3": 400, "6": 150}), 0, 0),
    "drained-in-run": (run_stats({"0": 20, "2": 15}), 0, 0),
    "nothing-deferred": (run_stats({}), 0, 0),
    "qubesshm-deferred": (run_stats({"1": 300}, deferred=12), 30, 12),
}


def case(name: str) -> tuple[dict[str, Any], Any]:
    """The report of a case and qubesshm's samples over it."""
    demo_figure = figure_module()
    stats, peak, at_exit = CASES[name]
    report = build_report(stats, kernels_for("both"), 2.0)
    measured = demo_figure.Measured()
    for tenth in range(63):
        t = tenth / 10
        deferred = peak if 2.0 <= t < 3.0 else at_exit if t >= 5.0 else 0
        measured.add({"grants": {"deferred": deferred, "live": 100},
                      "lifetimes": {"seconds": t, "peak_deferred_backlog": peak}}, t)
    return report, measured


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_headline_gives_the_reports_figures(name: str) -> None:
    demo_figure = figure_module()
    report, measured = case(name)
    sentence = demo_figure.headline(report, measured)
    assert numbers(sentence) == headline_numbers(report, measured), sentence
    assert sentence.count(";") == 1 and sentence.endswith(".")
    assert "without unmap notify" in sentence and "stock kernel" in sentence
    if name == "stock-left-at-exit":
        stock = report["kernels"]["stock"]
        assert f"left {stock['agent_backlog_at_exit']:,} pages there at exit" in sentence
        assert f"draining for {stock['agent_drain_seconds']:,} s more" in sentence
        assert sentence.startswith("qubesshm kept the deferred list at 0 pages")
    if name == "nothing-deferred":
        assert "would have deferred none either" in sentence
    if name == "qubesshm-deferred":
        assert sentence.startswith("qubesshm had at most 30 pages on the deferred list "
                                   "(12 at exit)")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_agent_runs_headline_gives_its_figures_against_todays_agents(name: str) -> None:
    demo_figure = figure_module()
    report, measured = case(name)
    sentence = demo_figure.headline(report, measured, demo_figure.AGENT)
    # The same figures in the same order as the proxy run's headline, in agent mode's words.
    assert numbers(sentence) == headline_numbers(report, measured), sentence
    assert sentence.startswith("As the GUI agent, qubesshm ")
    assert sentence.count(";") == 1 and sentence.endswith(".")
    assert "today's GUI agents" in sentence and "stock kernel" in sentence
    assert "unmap notify" not in sentence
    if name == "nothing-deferred":
        assert "would have deferred none either on a stock kernel: no window let go" in sentence
    if name == "stock-left-at-exit":
        stock = report["kernels"]["stock"]
        assert f"left {stock['agent_backlog_at_exit']:,} pages there at exit" in sentence


def synthetic_screen(demo_figure: ModuleType, places: dict[str, tuple[int, int]],
                     dim: float = 1.0) -> Any:
    """A 1024x640 grey, noisy desktop with the clients' windows at ``places`` (the churn
    window drawn last, above the pattern's), dimmed by ``dim``."""
    rng = np.random.default_rng(7)
    screen = rng.integers(90, 130, size=(640, 1024, 3), dtype=np.uint8)
    sizes = {"pattern": demo_figure.PATTERN_SIZE, "churn": demo_figure.CHURN_SIZE}
    for client in ("pattern", "churn"):
        if client in places:
            (x, y), (w, h) = places[client], sizes[client]
            pixels = demo_figure.expected_rgb(w, h)
            screen[y:y + h, x:x + w] = (pixels * dim).astype(np.uint8)
    return screen


def test_the_windows_are_found_on_the_screen_by_their_pixels() -> None:
    demo_figure = figure_module()
    apart = demo_figure.find_windows(synthetic_screen(
        demo_figure, {"pattern": (40, 60), "churn": (500, 300)}))
    assert [(w.client, w.x, w.y, w.clean, w.shown) for w in apart] == [
        ("pattern", 40, 60, True, 1.0), ("churn", 500, 300, True, 1.0)]
    assert demo_figure.is_best_shot(apart)
    # The churn window over the pattern's lower right: the pattern is still undimmed
    # where it shows, and found by its top-left corner.
    over = demo_figure.find_windows(synthetic_screen(
        demo_figure, {"pattern": (40, 60), "churn": (200, 200)}))
    assert [(w.client, w.x, w.y, w.clean) for w in over] == [
        ("pattern", 40, 60, True), ("churn", 200, 200, True)]
    assert over[0].shown == pytest.approx(1 - (160 * 100) / (320 * 240))
    assert not demo_figure.is_best_shot(over)
    # Dimmed (a fade) the pattern's pixels are not its own: not found, so not labelled.
    assert demo_figure.find_windows(synthetic_screen(demo_figure, {"pattern": (40, 60)},
                                                     dim=0.8)) == []
    alone = demo_figure.find_windows(synthetic_screen(demo_figure, {"pattern": (700, 10)}))
    assert [(w.client, w.x, w.y) for w in alone] == [("pattern", 700, 10)]
    assert demo_figure.shot_quality(apart) > demo_figure.shot_quality(over) > \
        demo_figure.shot_quality(alone) > demo_figure.shot_quality([])


def texts(figure: Any) -> dict[str, str]:
    """The figure's texts that have a gid, by gid."""
    from matplotlib.text import Text

    return {t.get_gid(): t.get_text() for t in figure.findobj(Text) if t.get_gid()}


def lines(figure: Any) -> dict[str, list[Any]]:
    """The figure's plotted lines by gid (a list: a line may be drawn in both panels)."""
    from matplotlib.lines import Line2D

    found: dict[str, list[Any]] = {}
    for line in figure.findobj(Line2D):
        if line.get_gid():
            found.setdefault(line.get_gid(), []).append(line)
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_figure_holds_the_headline_the_lines_and_the_jargon(name: str) -> None:
    demo_figure = figure_module()
    report, measured = case(name)
    figure = demo_figure.build_figure(report, measured, None, [], seconds=5, churn_windows=8)
    figure.savefig(io.BytesIO(), format="png")  # lays out and draws without error
    shown = texts(figure)
    assert " ".join(shown["headline"].split()) == demo_figure.headline(report, measured)
    for term in ("gntalloc limit", "deferred list", "unmap notify"):
        assert f"term-{term}" in shown and len(shown[f"meaning-{term}"]) > 40
    drawn = lines(figure)
    # qubesshm's line is its samples, ending with what the report has at exit.
    (ours,) = drawn["line-qubesshm"]
    assert list(ours.get_ydata()) == [*measured.deferred, report["grant_pages_deferred"]]
    assert list(ours.get_xdata()) == [*measured.t, report["seconds"]]
    # The modelled agent's lines are the report's model, second by second.
    added = {int(s): n for s, n in report["pages_retired_while_held_by_second"].items()}
    for kernel, rate in (("stock", 10), ("qubes", 1000)):
        assert report["kernels"][kernel]["free_per_iteration"] == rate
        model = deferred_list_by_second(added, rate, report["seconds"])
        first = drawn[f"line-{kernel}"][0]
        assert list(first.get_ydata()) == [*model, model[-1]]
        assert list(first.get_xdata()) == list(range(len(model) + 1))
    legend = "\n".join(t.get_text() for t in figure.legends[0].get_texts())
    assert legend.count("modelled") == 2 and "qubesshm, measured" in legend
    stock = report["kernels"]["stock"]
    if stock["agent_backlog_at_exit"]:
        assert f"{stock['agent_backlog_at_exit']:,} at exit, empty " \
               f"{stock['agent_drain_seconds']:,} s later" in legend
        # The list left at exit drains in a second panel, on a longer time scale.
        assert len(drawn["line-stock"]) == 2


def test_the_screenshot_is_labelled_with_what_is_on_it() -> None:
    demo_figure = figure_module()
    report, measured = case("stock-left-at-exit")
    screen = synthetic_screen(demo_figure, {"pattern": (40, 60), "churn": (200, 200)})
    windows = demo_figure.find_windows(screen)
    figure = demo_figure.build_figure(report, measured, screen, windows, seconds=5,
                                      churn_windows=8)
    figure.savefig(io.BytesIO(), format="png")
    shown = texts(figure)
    assert shown["label-pattern"].startswith("pattern client: one window, animating 5 s")
    assert "79% of it in view" in shown["label-pattern"]
    assert shown["label-churn"].startswith("churn client: one of the 8 windows")
    assert "label-missing" not in shown
    assert "fits a stock kernel's 1,024" in shown["key-figures"]
    boxes = {p.get_gid(): p for p in figure.findobj() if str(p.get_gid()).startswith("box-")}
    assert boxes["box-pattern"].get_xy() == (40 - 2.5, 60 - 2.5)
    assert boxes["box-churn"].get_xy() == (200 - 2.5, 200 - 2.5)
    # No churn window on the shot: the picture says so.
    alone = demo_figure.find_windows(synthetic_screen(demo_figure, {"pattern": (40, 60)}))
    shown = texts(demo_figure.build_figure(report, measured, screen, alone))
    assert "label-churn" not in shown
    assert shown["label-missing"].startswith("no churn window in view")


DAEMON = {"windows": 4, "dumps": 6, "barriers": 3, "acks": 9, "ack_p50_ms": 5.94,
          "ack_max_ms": 17.3}


def test_the_agent_runs_figure_is_worded_for_agent_mode() -> None:
    demo_figure = figure_module()
    report, measured = case("stock-left-at-exit")
    screen = synthetic_screen(demo_figure, {"pattern": (40, 60)})
    windows = demo_figure.find_windows(screen)
    figure = demo_figure.build_figure(report, measured, screen, windows, seconds=5,
                                      churn_windows=8, mode=demo_figure.AGENT, daemon=DAEMON)
    figure.savefig(io.BytesIO(), format="png")
    shown = texts(figure)
    assert " ".join(shown["headline"].split()) == demo_figure.headline(
        report, measured, demo_figure.AGENT)
    assert "term-dump, ACK" in shown and "term-unmap notify" not in shown
    assert "GUI daemon still mapped it" in " ".join(shown["meaning-deferred list"].split())
    assert shown["key-figures"].splitlines()[-1] == (
        "The GUI daemon (emulated): 4 windows, 6 dumps (+3 barriers), 9 ACKs after 5.9 ms "
        "(median).")
    titles = [axes.get_title() for axes in figure.axes if axes.get_title()]
    assert titles[0].startswith("the emulated GUI daemon's X screen mid-run")
    # No fades on the emulator's screen.
    assert shown["label-missing"] == ("no churn window in view at this moment: each shows "
                                      "for a moment, then closes")
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert [line.split(",")[0] for line in legend[1:]] == ["today's GUI agents"] * 2
    assert not any("unmap notify" in line for line in legend)
    # The proxy run's picture keeps its own words, and no daemon line.
    proxy = texts(demo_figure.build_figure(report, measured, screen, windows))
    assert "term-unmap notify" in proxy and "term-dump, ACK" not in proxy
    assert len(proxy["key-figures"].splitlines()) == 3


def agent_stats(ack_count: int) -> dict[str, Any]:
    """The agent's counters at exit, as ``qubesshm.agent.main.agent_summary`` reads them."""
    return {
        "commits": 120, "bytes_copied": 3 << 20,
        "daemon": {"created": 4, "dumps": 6, "barriers": 3, "acks": 9},
        "grants": {"shared_total": 300, "ended_total": 300, "deferred": 0, "leaked": 0,
                   "live": 0, "peak_live": 200},
        "lifetimes": {"pending_releases": 0, "pending_acks": 0, "ended_on_release": 1,
                      "recycled_on_release": 2, "wrong_releases": 0, "forced_late": 0,
                      "confirm_latency_ms": {"count": 3, "p50": 7.5, "max": 9.0},
                      "ack_latency_ms": {"count": ack_count, "p50": 5.94, "max": 17.3}},
    }


def test_the_daemons_figures_are_read_from_the_agents_exit_line() -> None:
    demo_agent = example("demo_agent")
    line = f"qubesshm: {agent_summary(agent_stats(9))}"
    stderr = f"churn: 3 windows in 1.8 s\n{line}\nqubesshm report (6.5 s, 2 client(s)):\n"
    assert demo_agent.daemon_figures(stderr) == DAEMON
    without = demo_agent.daemon_figures(f"qubesshm: {agent_summary(agent_stats(0))}")
    assert without == {"windows": 4, "dumps": 6, "barriers": 3, "acks": 9}
    # The proxy's exit line is not the agent's.
    assert demo_agent.daemon_figures("qubesshm: summary: 212 commits, 14.5 MiB damaged") is None


def test_a_missing_xvfb_is_said_in_one_line() -> None:
    demo_agent = example("demo_agent")
    with pytest.raises(demo_agent.XvfbMissing) as raised, \
            demo_agent.private_xvfb(binary="Xvfb-not-installed-here"):
        pytest.fail("started an Xvfb that is not there")
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith("Xvfb-not-installed-here is not installed")
    assert "apt-get install xvfb" in str(raised.value)


@pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb (.ci/install installs it)")
def test_the_private_x_screen_is_read_back_as_drawn() -> None:
    import xcffib
    import xcffib.xproto as xp

    demo_agent = example("demo_agent")
    colour = 0xFF8000  # red 255, green 128, blue 0: the byte order shows
    with demo_agent.private_xvfb((64, 48)) as xvfb:
        assert xvfb.display.startswith(":") and xvfb.process.poll() is None
        conn = xcffib.connect(display=xvfb.display)
        try:
            root = conn.get_setup().roots[0]
            window = conn.generate_id()
            conn.core.CreateWindow(root.root_depth, window, root.root, 10, 20, 30, 16, 0,
                                   xp.WindowClass.InputOutput, root.root_visual,
                                   xp.CW.BackPixel, [colour])
            conn.core.MapWindow(window)
            conn.flush()
            deadline = time.monotonic() + 30
            while True:
                screen = demo_agent.grab_screen(xvfb.display)
                if (screen[20:36, 10:40] == (255, 128, 0)).all():
                    break
                assert time.monotonic() < deadline, "the window never showed"
                time.sleep(0.02)
        finally:
            conn.disconnect()
        assert screen.shape == (48, 64, 3) and screen.dtype == np.uint8
        outside = np.ones((48, 64), dtype=bool)
        outside[20:36, 10:40] = False
        assert not screen[outside].any()  # Xvfb's root is black
        process = xvfb.process
    assert process.poll() is not None  # ended with the block


def colours_drawn(demo_figure: ModuleType, picture: Path,
                  windows: list[Any]) -> None:
    """What was drawn in each colour is on ``picture``: the lines and the pattern window's
    box and label (a churn window's too when the shot caught one)."""
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.size[0] > 1.5 * image.size[1]
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = ["qubesshm", "stock", "qubes", "pattern"]
    colours += ["churn"] if any(w.client == "churn" for w in windows) else []
    for name in colours:
        rgb = [int(demo_figure.COLOURS[name][i:i + 2], 16) for i in (1, 3, 5)]
        assert int((pixels == rgb).all(axis=1).sum()) > 200, (picture.name, name)


def read_png(path: Path) -> Any:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_demo_runs_both_clients_prints_the_report_and_saves_the_figure(
        tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY",
                                                              "WAYLAND_SOCKET")}
    env["XDG_RUNTIME_DIR"] = str(runtime)
    figure, data = tmp_path / "demo.png", tmp_path / "demo.json"
    result = subprocess.run(
        [sys.executable, str(DEMO), "--seconds", "2", "--windows", "3", "--screenshot",
         str(figure), "--json", str(data)], env=env, capture_output=True, text=True,
        timeout=240, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting a headless Weston" in result.stdout
    assert result.stdout.count("churn: 3 windows") == 2
    # Both runs print their report: the proxy's, then the agent's.
    assert result.stderr.count("qubesshm report (") == 2
    assert result.stderr.count(", 2 client(s)):") == 2
    assert "on a stock kernel" in result.stderr
    assert f"the deferred list over the run, the headline) saved to {figure}" in result.stdout
    assert "demo: qubesshm run exited with status 0" in result.stdout
    saved = json.loads(data.read_text())
    demo_figure = figure_module()
    report = saved["report"]
    measured = demo_figure.Measured.from_json(saved["measured"])
    # The headline, printed and drawn, is made of the report's figures.
    assert numbers(saved["headline"]) == headline_numbers(report, measured)
    assert saved["headline"] == demo_figure.headline(report, measured)
    assert f"demo: {saved['headline']}" in result.stdout
    # qubesshm's counters were read while it ran, on the report's clock.
    assert len(measured.t) >= 10 and measured.t == sorted(measured.t)
    assert measured.t[-1] <= report["seconds"] + 0.5
    assert max(measured.live) > 0
    # The shot was taken once the pattern showed undimmed (past the start-up fade).
    windows = [demo_figure.Window(**w) for w in saved["windows"]]
    assert saved["screenshot"] and [w.clean for w in windows if w.client == "pattern"] == [True]
    assert "windows labelled on the screen: pattern at (" in result.stdout
    rebuilt = demo_figure.build_figure(report, measured, None, [])
    assert {"line-qubesshm", "line-stock", "line-qubes"} <= set(lines(rebuilt))
    colours_drawn(demo_figure, figure, windows)
    assert (tmp_path / "demo-proxy-screen.png").exists()

    # -- the same clients in agent mode, on the emulator's private Xvfb ---------------------
    assert "demo: agent mode: the same clients through `qubesshm run --agent --emulator`, " \
           "the GUI-daemon emulator on a private Xvfb (:" in result.stdout
    agent_figure = tmp_path / "demo-agent.png"
    agent = saved["agent"]
    report = agent["report"]
    measured = demo_figure.Measured.from_json(agent["measured"])
    # Its report, printed: nothing deferred, nothing leaked by qubesshm, and what today's
    # agents would have left, as in the proxy's.
    agent_report = result.stderr[result.stderr.rindex("qubesshm report ("):]
    assert ", deferred 0, leaked 0;" in agent_report, agent_report
    assert "on a stock kernel" in agent_report
    assert report["grant_pages_deferred"] == 0 and report["grant_pages_leaked"] == 0
    assert report["clients"] == 2 and report["grant_pages_shared"] > 0
    assert not any(measured.deferred) and not measured.peak_backlog
    assert len(measured.t) >= 10 and max(measured.live) > 0
    # The agent's exit line: every window went to the daemon, every dump was ACKed.
    summary = [line for line in result.stderr.splitlines()
               if line.startswith("qubesshm: ") and " ACKs; " in line]
    assert len(summary) == 1 and ", 0 deferred, 0 leaked, 0 live" in summary[0], summary
    daemon = agent["daemon"]
    assert daemon["windows"] == 1 + 3  # the pattern's and the churn client's three
    assert daemon["dumps"] >= daemon["windows"]
    assert daemon["acks"] == daemon["dumps"] + daemon["barriers"]
    assert agent["headline"] == demo_figure.headline(report, measured, demo_figure.AGENT)
    assert numbers(agent["headline"]) == headline_numbers(report, measured)
    assert agent["headline"].startswith("As the GUI agent, qubesshm kept the deferred list "
                                        "at 0 pages through ")
    assert f"demo: {agent['headline']}" in result.stdout
    assert f"the headline) saved to {agent_figure}" in result.stdout
    assert "demo: qubesshm run --agent exited with status 0" in result.stdout
    # The emulator's X screen, as captured: the clients' windows are there pixel for
    # pixel, on the black root.
    windows = [demo_figure.Window(**w) for w in agent["windows"]]
    assert agent["screenshot"]
    assert [w.clean for w in windows if w.client == "pattern"] == [True]
    assert "windows labelled on the emulator's X screen: pattern at (" in result.stdout
    screen = read_png(tmp_path / "demo-agent-screen.png")
    assert screen.shape[:2] == (640, 1024)
    inside = np.zeros(screen.shape[:2], dtype=bool)
    for w in windows:
        box = screen[w.y:w.y + w.height, w.x:w.x + w.width]
        assert (box.max(axis=2) > 0).mean() > 0.8, w  # the pattern is mostly not black
        inside[w.y:w.y + w.height, w.x:w.x + w.width] = True
    # Every pixel of the pattern's window not under a churn window is the client's.
    pattern = next(w for w in windows if w.client == "pattern")
    expected = demo_figure.expected_rgb(pattern.width, pattern.height)
    box = (slice(pattern.y, pattern.y + pattern.height),
           slice(pattern.x, pattern.x + pattern.width))
    visible = np.zeros(screen.shape[:2], dtype=bool)
    visible[box] = True
    for w in windows:
        if w.client == "churn":
            visible[w.y:w.y + w.height, w.x:w.x + w.width] = False
    exact = np.zeros(screen.shape[:2], dtype=bool)
    exact[box] = (screen[box] == expected).all(axis=2)
    assert int(visible.sum()) == pattern.visible > 0 and exact[visible].all()
    # Outside the windows found, the root (or a churn window the finder did not count).
    assert (screen[~inside].max(axis=1) == 0).mean() > 0.5
    colours_drawn(demo_figure, agent_figure, windows)


def test_the_demo_runs_with_no_session_as_on_a_fresh_machine(tmp_path: Path) -> None:
    """The README's main command in a root shell of a fresh machine: no
    $XDG_RUNTIME_DIR, no compositor, no display. Both parts still run."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WAYLAND_DISPLAY", "WAYLAND_SOCKET", "XDG_RUNTIME_DIR", "DISPLAY")}
    result = subprocess.run(
        [sys.executable, str(DEMO), "--seconds", "2", "--windows", "3", "--screenshot",
         str(tmp_path / "demo.png")], env=env, capture_output=True, text=True,
        timeout=240, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: qubesshm run exited with status 0" in result.stdout
    assert "demo: qubesshm run --agent exited with status 0" in result.stdout, (
        result.stdout + result.stderr)
    assert (tmp_path / "demo-agent.png").exists()
