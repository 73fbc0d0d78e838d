#!/usr/bin/env python3
"""slimta's SmtpEdge as a sink for the SMTP accept benchmark.

The edge does its full work for every message (protocol, limits, building
the Envelope) and hands it to a queue object that drops it and answers with
a made-up id, so the client gets ``250 2.6.0 Message queued as <id>``.
Nothing is stored and nothing is logged per message.

    python bench/slimta_sink.py [--host 127.0.0.1] [--port 2510] [--uvloop | --no-uvloop]

Runs in the foreground until SIGTERM or SIGINT, then stops the edge
gracefully. The event loop is uvloop when it can be imported, unless
``--no-uvloop`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys

from benchloop import add_uvloop_option, loop_factory, stop_event

from slimta.edge.smtp import SmtpEdge


class DropQueue:
    """Takes every envelope, keeps none: ``[(envelope, id)]`` like a queue."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)

    async def enqueue(self, envelope):
        return [(envelope, f"drop{next(self._ids):08x}")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=2510)
    ap.add_argument(
        "--hostname",
        default="bench.local",
        help="name in the banner (given, so there is no getfqdn() lookup)",
    )
    add_uvloop_option(ap)
    return ap.parse_args(argv)


async def serve(args: argparse.Namespace, loop_name: str) -> None:
    edge = SmtpEdge((args.host, args.port), DropQueue(), hostname=args.hostname)
    edge.start()
    stopping = stop_event()
    print(f"slimta SmtpEdge sink on {args.host}:{args.port} loop={loop_name}", flush=True)
    try:
        await stopping.wait()
    finally:
        await edge.stop()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    factory, loop_name = loop_factory(args.uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args, loop_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
