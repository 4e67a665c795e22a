"""``qubesshm tune`` and the --grants / QUBESSHM_GRANTS selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qubesshm.grants.params import FREE_PER_ITERATION, GNTALLOC_LIMIT
from qubesshm.grants.select import GrantsChoiceError, choose
from qubesshm.grants.simulated import SimBackend, SimHypervisor


def qubesshm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qubesshm", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, QUBESSHM_SIM_ROOT=str(tmp_path / "sim"), QUBESSHM_GRANTS="sim")


def test_choose(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QUBESSHM_GRANTS", raising=False)
    assert choose(None, device_dir=tmp_path) == "sim"
    (tmp_path / "gntalloc").touch()
    assert choose(None, device_dir=tmp_path) == "xen"
    assert choose("sim", device_dir=tmp_path) == "sim"
    monkeypatch.setenv("QUBESSHM_GRANTS", "sim")
    assert choose(None, device_dir=tmp_path) == "sim"
    assert choose("xen", device_dir=tmp_path) == "xen"  # the option wins
    monkeypatch.setenv("QUBESSHM_GRANTS", "bogus")
    with pytest.raises(GrantsChoiceError, match="QUBESSHM_GRANTS"):
        choose(None)


def test_tune_shows_and_sets_simulated_parameters(env: dict[str, str]) -> None:
    shown = qubesshm("tune", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "grants: sim" in shown.stdout
    assert "free_per_iteration    10\n" in shown.stdout
    assert "gntalloc limit        1024\n" in shown.stdout
    changed = qubesshm("tune", "--free-per-iteration", "1000", "--gntalloc-limit", "4096",
                       env=env)
    assert changed.returncode == 0, changed.stderr
    assert "free_per_iteration    1000\n" in changed.stdout
    root = Path(env["QUBESSHM_SIM_ROOT"])
    assert (root / FREE_PER_ITERATION).read_text() == "1000\n"
    assert (root / GNTALLOC_LIMIT).read_text() == "4096\n"
    # A simulated hypervisor reads what tune wrote, and tune shows its counters.
    hv = SimHypervisor(root)
    assert hv.params.free_per_iteration == 1000
    vm, gui = SimBackend(hv, 1), SimBackend(hv, 0)
    area = vm.share(0, 3)
    gui.map([(1, ref) for ref in area.refs])  # held: the grants must defer
    vm.unshare(area)
    counters = qubesshm("tune", env=env)
    assert "deferred_count        3\n" in counters.stdout
    gui.close()
    vm.close()


def test_tune_sets_parameters_of_a_fresh_simulated_kernel(env: dict[str, str]) -> None:
    changed = qubesshm("tune", "--free-per-iteration", "0", env=env)
    assert changed.returncode == 0, changed.stderr
    assert "free_per_iteration    0\n" in changed.stdout
    assert "gntalloc limit        1024\n" in changed.stdout


def test_tune_errors(env: dict[str, str], tmp_path: Path) -> None:
    negative = qubesshm("tune", "--free-per-iteration", "-1", env=env)
    assert negative.returncode == 1
    assert "not an unsigned 32-bit value" in negative.stderr
    root = Path(env["QUBESSHM_SIM_ROOT"])
    qubesshm("tune", env=env)
    (root / FREE_PER_ITERATION).unlink()
    older = qubesshm("tune", "--free-per-iteration", "5", env=env)
    assert older.returncode == 1
    assert "Linux 6.5" in older.stderr
    (root / GNTALLOC_LIMIT).chmod(0o444)
    # Root writes through any mode bits: run without capabilities (CAP_DAC_OVERRIDE).
    prefix = ["setpriv", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
    denied = subprocess.run([*prefix, sys.executable, "-m", "qubesshm", "tune",
                             "--gntalloc-limit", "5"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)
    assert denied.returncode == 1 and "not permitted" in denied.stderr, denied.stderr
    assert "Traceback" not in denied.stderr
    xen = qubesshm("tune", "--grants", "xen", env=env)
    assert xen.returncode == 1
    assert "/dev/xen/gntalloc" in xen.stderr and "--grants sim" in xen.stderr


def test_serve_refuses_xen_without_devices(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--grants", "xen", env=env)
    assert result.returncode == 1
    assert "/dev/xen/gntalloc" in result.stderr and "--grants sim" in result.stderr
