"""Socket names, upstream resolution and extra protocol directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qubesshm.relay.listener import AddressError, Listener, runtime_path, upstream_path
from qubesshm.relay.session import RelaySession
from qubesshm.wire.codec import encode_message
from qubesshm.wire.protocol import ProtocolLoadError, load_protocols

EXTRA_XML = """<?xml version="1.0" encoding="UTF-8"?>
<protocol name="qubesshm_test">
  <interface name="qubesshm_test_v1" version="2">
    <request name="destroy" type="destructor"/>
    <event name="hello"><arg name="text" type="string"/></event>
  </interface>
</protocol>
"""


def test_upstream_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("WAYLAND_DISPLAY", "from-env")
    assert upstream_path("given") == tmp_path / "given"
    assert upstream_path("/abs/sock") == Path("/abs/sock")
    assert upstream_path(None) == tmp_path / "from-env"
    monkeypatch.setenv("WAYLAND_DISPLAY", "/abs/env-sock")
    assert upstream_path(None) == Path("/abs/env-sock")
    monkeypatch.delenv("WAYLAND_DISPLAY")
    assert upstream_path(None) == tmp_path / "wayland-0"


def test_relative_name_needs_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    with pytest.raises(AddressError, match="XDG_RUNTIME_DIR is not set"):
        runtime_path("qubesshm-0")
    assert runtime_path("/run/x/sock") == Path("/run/x/sock")


def test_listener_lock_and_cleanup(tmp_path: Path) -> None:
    first = Listener(str(tmp_path / "sock"))
    with pytest.raises(AddressError, match=r"sock\.lock"):
        Listener(str(tmp_path / "sock"))
    first.close()
    assert not (tmp_path / "sock").exists()
    assert not (tmp_path / "sock.lock").exists()
    (tmp_path / "sock").write_text("stale")
    again = Listener(str(tmp_path / "sock"))
    assert (tmp_path / "sock").is_socket()
    again.close()


def test_protocol_dir_makes_a_global_visible(tmp_path: Path) -> None:
    (tmp_path / "qubesshm-test.xml").write_text(EXTRA_XML)
    for dirs, visible in (([], False), ([tmp_path], True)):
        protocol = load_protocols(dirs)
        session = RelaySession(protocol)
        get_registry = protocol["wl_display"].requests[1]
        session.from_client(encode_message(1, get_registry, [2])[0])
        global_ = protocol["wl_registry"].events[0]
        event = encode_message(2, global_, [7, "qubesshm_test_v1", 5])[0]
        step = session.from_compositor(event)
        assert step.error is None
        if visible:
            # Advertised at 5, capped at the XML's 2.
            assert step.to_client == [(encode_message(2, global_, [7, "qubesshm_test_v1",
                                                                    2])[0], [])]
        else:
            assert step.to_client == []


def test_bad_protocol_dirs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtocolLoadError, match="does not exist"):
        load_protocols([tmp_path / "missing"])
    with pytest.raises(ProtocolLoadError, match=r"holds no \*\.xml"):
        load_protocols([tmp_path])
    (tmp_path / "broken.xml").write_text("<protocol name='x'><interface/></protocol>")
    with pytest.raises(ProtocolLoadError, match=r"broken\.xml"):
        load_protocols([tmp_path])
    clash = tmp_path / "clash"
    clash.mkdir()
    (clash / "wl.xml").write_text(
        "<protocol name='x'><interface name='wl_compositor' version='1'/></protocol>")
    with pytest.raises(ProtocolLoadError, match="defined twice"):
        load_protocols([clash])
    result = subprocess.run(
        [sys.executable, "-m", "qubesshm", "serve", "--protocol-dir", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "does not exist" in result.stderr
