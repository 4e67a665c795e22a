"""Keymaps compiled by xkbcommon: Qubes' layout strings, the sealed memfd, modifier state.

The layout string is the one dom0 gives a qube (``qubes.SetKeyboardLayout``, the
``/keyboard-layout`` QubesDB entry): ``layout+variant+options``, which the Linux
agent's qubes-keymap script cuts into fields 1, 2 and 3 at ``+``.
"""

from __future__ import annotations

import fcntl
import mmap
import os

import pytest

from qubesshm.compositor.keymap import Keymap, KeymapError, KeymapNames

KEY_Q, KEY_Y, KEY_Z, KEY_CAPSLOCK, KEY_LEFTSHIFT, KEY_LEFTCTRL, KEY_E = 16, 21, 44, 58, 42, 29, 18


@pytest.mark.parametrize(("spec", "names"), [
    ("de", KeymapNames("de")),
    ("us+dvorak", KeymapNames("us", "dvorak")),
    ("de+nodeadkeys+ctrl:nocaps", KeymapNames("de", "nodeadkeys", "ctrl:nocaps")),
    ("us++compose:ralt", KeymapNames("us", "", "compose:ralt")),
    ("fr+", KeymapNames("fr")),
    ("", KeymapNames("us")),
    ("us,de", KeymapNames("us,de")),
    ("us,de+,nodeadkeys+grp:alt_shift_toggle",
     KeymapNames("us,de", ",nodeadkeys", "grp:alt_shift_toggle")),
])
def test_qubes_layout_strings(spec: str, names: KeymapNames) -> None:
    keymap = Keymap.parse(spec)
    assert keymap.names == names
    assert keymap.text.startswith(b"xkb_keymap {")


def test_layouts_type_their_own_letters() -> None:
    us = Keymap.parse("us").state()
    de = Keymap.parse("de").state()
    dvorak = Keymap.parse("us+dvorak").state()
    assert (us.text(KEY_Y), us.text(KEY_Z)) == ("y", "z")
    assert (de.text(KEY_Y), de.text(KEY_Z)) == ("z", "y")
    assert (dvorak.text(KEY_Q), dvorak.text(KEY_E)) == ("'", ".")


def test_options_apply() -> None:
    """ctrl:nocaps makes Caps Lock a Control key: it sets the Control modifier."""
    plain = Keymap.parse("de+nodeadkeys").state()
    nocaps = Keymap.parse("de+nodeadkeys+ctrl:nocaps").state()
    plain.press(KEY_CAPSLOCK)
    plain.release(KEY_CAPSLOCK)
    nocaps.press(KEY_CAPSLOCK)
    ctrl = Keymap.parse("us").state()
    ctrl.press(KEY_LEFTCTRL)
    assert nocaps.modifiers()[0] == ctrl.modifiers()[0] != 0
    assert plain.modifiers()[0] == 0 and plain.modifiers()[2] != 0  # Lock is locked


@pytest.mark.parametrize(("spec", "named"), [
    ("xx", "layout 'xx'"),
    ("us+nosuchvariant", "variant 'nosuchvariant'"),
    ("us++nosuch:option", "options 'nosuch:option'"),
    ("us+dvorak+ctrl:nocaps+extra", "'us+dvorak+ctrl:nocaps+extra'"),
    ("us; rm -rf", "'us; rm -rf'"),
])
def test_a_bad_layout_is_a_keymap_error_naming_it(spec: str, named: str) -> None:
    with pytest.raises(KeymapError) as caught:
        Keymap.parse(spec)
    assert named in str(caught.value)


def test_the_keymap_is_a_sealed_memfd_each_client_reads_on_its_own() -> None:
    keymap = Keymap.parse("de")
    first, second = keymap.fd(), keymap.fd()
    try:
        assert first != second
        seals = fcntl.fcntl(first, fcntl.F_GET_SEALS)
        wanted = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
        assert seals & wanted == wanted
        assert os.fstat(first).st_size == keymap.size == len(keymap.text) + 1
        # Offsets are not shared: reading one does not move the other.
        assert os.read(first, 10) == keymap.text[:10]
        assert os.read(second, 10) == keymap.text[:10]
        with mmap.mmap(first, keymap.size, mmap.MAP_PRIVATE, mmap.PROT_READ) as memory:
            assert memory[:] == keymap.text + b"\0"
        with pytest.raises(OSError):
            os.write(first, b"x")
        with pytest.raises(PermissionError):
            mmap.mmap(second, keymap.size, mmap.MAP_SHARED, mmap.PROT_WRITE)
    finally:
        os.close(first)
        os.close(second)


def test_key_state_tracks_held_keys_and_modifiers() -> None:
    state = Keymap.parse("us").state()
    assert state.modifiers() == (0, 0, 0, 0)
    assert state.press(KEY_LEFTSHIFT)
    assert not state.press(KEY_LEFTSHIFT)  # already down
    assert state.modifiers()[0] == 1
    assert state.text(KEY_Z) == "Z"
    assert state.release(KEY_LEFTSHIFT)
    assert not state.release(KEY_LEFTSHIFT)
    assert state.modifiers() == (0, 0, 0, 0)
    assert state.held == []
    state.press(KEY_CAPSLOCK)
    state.release(KEY_CAPSLOCK)
    assert state.modifiers()[2] == 2  # Lock, locked
    assert state.text(KEY_Z) == "Z"
