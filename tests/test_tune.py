"""``qubesshm tune``, the simulated kernels it acts on, and --grants / QUBESSHM_GRANTS.

Every serve or run boots a simulated kernel of its own with a Qubes VM's
parameters (or Linux's with ``--kernel stock``); tune changes a running one as
sysfs would, and nothing a finished command set outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernels import base_of, qubesshm, serving, sim_env

from qubesshm.grants.params import FREE_PER_ITERATION, GNTALLOC_LIMIT
from qubesshm.grants.select import GrantsChoiceError, choose
from qubesshm.grants.simkernels import LOCK, KernelDir, running_kernels
from qubesshm.grants.simulated import SimBackend, SimHypervisor


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return sim_env(tmp_path / "run")


def shown(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    # After the heading, one row a figure: a label in 22 columns, then the value.
    return {line[:22].strip(): line[22:] for line in result.stdout.splitlines()[1:]}


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


def test_with_no_kernel_running_tune_shows_what_one_boots_with(env: dict[str, str]) -> None:
    result = qubesshm("tune", env=env)
    assert "no simulated kernel is running" in result.stdout
    values = shown(result)
    assert values["free_per_iteration"] == "1000"
    assert values["gntalloc limit"] == "1073741824"
    # Nothing to set: one clean line, nothing created.
    refused = qubesshm("tune", "--free-per-iteration", "5", env=env)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "no simulated kernel is running" in refused.stderr
    assert not base_of(env).exists()


def test_serve_boots_a_qubes_kernel_that_tune_changes_while_it_runs(
        env: dict[str, str]) -> None:
    with serving(env, "qs") as kernel:
        values = shown(qubesshm("tune", env=env))
        assert values["free_per_iteration"] == "1000"
        assert values["gntalloc limit"] == "1073741824"
        changed = qubesshm("tune", "--free-per-iteration", "7", "--gntalloc-limit", "4096",
                           env=env)
        assert f"process {kernel.pid}, serving {kernel.socket}" in changed.stdout
        assert shown(changed)["free_per_iteration"] == "7"
        assert (kernel.root / FREE_PER_ITERATION).read_text() == "7\n"
        assert (kernel.root / GNTALLOC_LIMIT).read_text() == "4096\n"
    # The kernel went with its process; what tune set does not outlive it.
    assert not kernel.root.exists()
    with serving(env, "qs") as again:
        assert (again.root / FREE_PER_ITERATION).read_text() == "1000\n"
        assert (again.root / GNTALLOC_LIMIT).read_text() == "1073741824\n"


def test_kernel_stock_boots_linux_defaults_and_leaves_nothing_behind(
        env: dict[str, str]) -> None:
    with serving(env, "qs", "--kernel", "stock") as kernel:
        values = shown(qubesshm("tune", env=env))
        assert values["free_per_iteration"] == "10"
        assert values["gntalloc limit"] == "1024"
        assert (kernel.root / GNTALLOC_LIMIT).read_text() == "1024\n"
    with serving(env, "qs") as after:
        assert (after.root / GNTALLOC_LIMIT).read_text() == "1073741824\n"


def test_several_kernels_are_told_apart_by_socket(env: dict[str, str]) -> None:
    with serving(env, "one", "--kernel", "stock") as one, serving(env, "two") as two:
        ambiguous = qubesshm("tune", env=env)
        assert ambiguous.returncode == 1
        assert "2 simulated kernels are running" in ambiguous.stderr
        assert "--socket NAME" in ambiguous.stderr and str(one.pid) in ambiguous.stderr
        assert shown(qubesshm("tune", "--socket", "one", env=env))["free_per_iteration"] == "10"
        set_two = qubesshm("tune", "--socket", "two", "--free-per-iteration", "3", env=env)
        assert shown(set_two)["free_per_iteration"] == "3"
        assert (two.root / FREE_PER_ITERATION).read_text() == "3\n"
        assert (one.root / FREE_PER_ITERATION).read_text() == "10\n"
        missing = qubesshm("tune", "--socket", "three", env=env)
        assert missing.returncode == 1 and "serves" in missing.stderr


def test_a_dead_kernels_directory_is_removed_by_the_next(env: dict[str, str]) -> None:
    base = base_of(env)
    base.mkdir(mode=0o700)
    dead = base / "999999"
    dead.mkdir(mode=0o700)
    (dead / LOCK).touch()  # its lock held by no one: its process is gone
    assert running_kernels(base) == []
    directory = KernelDir.create(base)
    try:
        assert not dead.exists()
        assert [k.root for k in running_kernels(base)] == [directory.root]
    finally:
        directory.close()
    assert running_kernels(base) == [] and not directory.root.exists()


def test_tune_shows_a_running_kernels_counters(env: dict[str, str], tmp_path: Path) -> None:
    directory = KernelDir.create(base_of(env))
    try:
        hv = SimHypervisor(directory.root)
        vm, gui = SimBackend(hv, 1), SimBackend(hv, 0)
        area = vm.share(0, 3)
        gui.map([(1, ref) for ref in area.refs])  # held: the grants must defer
        vm.unshare(area)
        assert shown(qubesshm("tune", env=env))["deferred_count"] == "3"
        gui.close()
        vm.close()
    finally:
        directory.close()


def test_tune_errors(env: dict[str, str]) -> None:
    for option in ("--free-per-iteration", "--gntalloc-limit"):
        negative = qubesshm("tune", option, "-1", env=env)
        assert negative.returncode == 2, negative.stderr
        assert f"argument {option}: -1 is not between" in negative.stderr
    with serving(env, "qs") as kernel:
        (kernel.root / FREE_PER_ITERATION).unlink()
        older = qubesshm("tune", "--free-per-iteration", "5", env=env)
        assert older.returncode == 1
        assert "Linux 6.5" in older.stderr
        (kernel.root / GNTALLOC_LIMIT).chmod(0o444)
        # Root writes through any mode bits: run without capabilities (CAP_DAC_OVERRIDE).
        prefix = ["setpriv", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []
        denied = subprocess.run([*prefix, sys.executable, "-m", "qubesshm", "tune",
                                 "--gntalloc-limit", "5"], env=env, capture_output=True,
                                text=True, timeout=60, check=False)
        assert denied.returncode == 1 and "not permitted" in denied.stderr, denied.stderr
        assert "Traceback" not in denied.stderr
        (kernel.root / GNTALLOC_LIMIT).chmod(0o600)
    xen = qubesshm("tune", "--grants", "xen", env=env)
    assert xen.returncode == 1
    assert "/dev/xen/gntalloc" in xen.stderr and "--grants sim" in xen.stderr


def test_serve_refuses_xen_without_devices(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--grants", "xen", env=env)
    assert result.returncode == 1
    assert "/dev/xen/gntalloc" in result.stderr and "--grants sim" in result.stderr


def test_kernel_stock_on_real_xen_is_a_usage_error(env: dict[str, str]) -> None:
    result = qubesshm("serve", "--grants", "xen", "--kernel", "stock", env=env)
    assert result.returncode == 2
    assert "on real Xen they are the machine's" in result.stderr
