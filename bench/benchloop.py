"""What the benchmark's Python servers and drivers share: the choice of event
loop (uvloop when it can be imported, unless told otherwise) and a stop
signal. Imported by the scripts beside it (``python bench/<script>.py``
puts this folder first on ``sys.path``)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal


def add_uvloop_option(ap: argparse.ArgumentParser) -> None:
    """``--uvloop`` / ``--no-uvloop``; neither leaves the choice to :func:`loop_factory`."""
    ap.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run on uvloop (default: when it can be imported)",
    )


def loop_factory(want_uvloop: bool | None):
    """The event loop constructor and its name."""
    if want_uvloop is None:
        want_uvloop = importlib.util.find_spec("uvloop") is not None
    if want_uvloop:
        import uvloop

        return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop, "asyncio"


def stop_event() -> asyncio.Event:
    """An event the running loop sets on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping
