"""Values the command line accepts, checked when it is parsed.

Each function turns one option's text into its value or raises
``argparse.ArgumentTypeError`` with a sentence naming what was expected, so a
mistake is one usage line and exit status 2 (never argparse's ``invalid
_positive value``, which names a function of ours).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from pathlib import Path

from .grants.files import check_output

U32_MAX = 2**32 - 1


def _number(text: str, convert: Callable[[str], int | float], what: str) -> int | float:
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def whole(text: str, lowest: int = 0, highest: int | None = None, what: str = "") -> int:
    """A whole number from ``lowest`` to ``highest`` (decimal digits only)."""
    value = int(_number(text.strip(), int, what or "a whole number"))
    if highest is not None and not lowest <= value <= highest:
        raise argparse.ArgumentTypeError(f"{text} is not between {lowest} and {highest}")
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{text} is not at least {lowest}")
    return value


def pages(text: str) -> int:
    """A number of 4 KiB pages, 0 or more."""
    return whole(text, 0, what="a whole number of pages")


def positive_pages(text: str) -> int:
    return whole(text, 1, what="a whole number of pages")


def positive(text: str) -> int:
    return whole(text, 1)


def windows_a_turn(text: str) -> int:
    """``bench churn --block``: windows a turn, 0 for none (one path after the other)."""
    return whole(text, 0, what="a whole number of windows (0: no turns)")


def u32(text: str) -> int:
    """A kernel module parameter: an unsigned 32-bit value."""
    return whole(text, 0, U32_MAX, "an unsigned 32-bit value")


def gntalloc_limit(text: str) -> int:
    return whole(text, 1, U32_MAX, "a gntalloc limit in pages")


def pid(text: str) -> int:
    return whole(text, 1, what="a process id")


def message_size(text: str) -> int:
    # A message needs its 8-byte header plus a word; its size field has 16 bits.
    return whole(text, 16, 65532, "a message size in bytes")


def _real(text: str, lowest: float, strict: bool, what: str) -> float:
    """A finite number above ``lowest`` (``strict``) or from it on."""
    value = float(_number(text.strip(), float, what))
    if not math.isfinite(value) or value < lowest or (strict and value == lowest):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def seconds(text: str) -> float:
    return _real(text, 0, True, "a positive number of seconds")


def non_negative_seconds(text: str) -> float:
    return _real(text, 0, False, "a number of seconds (0 or more)")


def rate(text: str) -> float:
    return _real(text, 0, True, "a positive number a second")


def warmup(text: str) -> int:
    value = positive(text)
    if value < 4:
        raise argparse.ArgumentTypeError(f"{value} frames do not fill the client's 3 buffers "
                                         "and the proxy's output buffers: give at least 4")
    return value


def window_size(text: str) -> str:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None or not (0 < int(match[1]) <= 8192 and 0 < int(match[2]) <= 8192):
        raise argparse.ArgumentTypeError(f"{text} is not a size WxH of 1..8192 each")
    return text


def region(text: str) -> int:
    value = positive(text)
    if value > 540:
        raise argparse.ArgumentTypeError(f"{value} does not fit twice in 1080 rows")
    return value


def output_file(text: str) -> str:
    """A file the command writes when its work is done, checked now (``check_output``) so
    that a mistake costs no work; the text is kept as given."""
    why = check_output(Path(text))
    if why is not None:
        raise argparse.ArgumentTypeError(why)
    return text


DOMID_LIMIT = 0x7FEF  # the last Xen domain id that names a domain (DOMID_FIRST_RESERVED - 1)


def domid(text: str) -> int:
    """A Xen domain id, 0 to 32751."""
    return whole(text, 0, DOMID_LIMIT, "a domain id")


def refresh_rate(text: str) -> float:
    """Frames per second of the agent's output: more than 0, at most 1000."""
    value = _real(text, 0.0, True, "a refresh rate in Hz")
    if value > 1000:
        raise argparse.ArgumentTypeError(f"{value:g} Hz is more than any output's 1000 Hz")
    return value
