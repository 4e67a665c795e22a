"""Which asyncio event loop drives the relay: uvloop (libuv) when installed, else asyncio's.

The relay's I/O layer only registers readers, writers, timers and signal handlers,
which both loops provide; uvloop runs those callbacks with less overhead per
wake-up. The choice is never silent: ``serve`` names the loop it runs on, and
asking for uvloop where it is not installed is an error, not a fallback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import import_module

CHOICES = ("auto", "uvloop", "asyncio")


class LoopChoiceError(RuntimeError):
    """The event loop asked for cannot be had."""


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """A factory for the loop ``choice`` names, and the name of the loop it makes."""
    if choice not in CHOICES:
        raise LoopChoiceError(f"unknown event loop {choice!r}: choose one of "
                              f"{', '.join(CHOICES)}")
    if choice != "asyncio":
        try:
            uvloop = import_module("uvloop")
        except ImportError as exc:
            if choice == "uvloop":
                raise LoopChoiceError(
                    f"--event-loop uvloop: uvloop is not installed ({exc}); install it "
                    "with 'python3 -m pip install uvloop', or use --event-loop asyncio"
                ) from exc
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory, f"uvloop {uvloop.__version__}"
    name = "asyncio" if choice == "asyncio" else "asyncio (uvloop is not installed)"
    return asyncio.new_event_loop, name
