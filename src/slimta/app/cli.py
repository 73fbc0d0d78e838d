"""The ``slimta`` command."""

from __future__ import annotations

import logging

import click

import slimta
from slimta.app.queuecli import queue
from slimta.app.send import send

__all__ = ["main"]


@click.group(invoke_without_command=True)
@click.version_option(slimta.__version__, prog_name="slimta")
@click.pass_context
def main(ctx: click.Context) -> None:
    """slimta: a mail transfer agent on asyncio."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@main.command()
@click.option("--listen", default="127.0.0.1:1025", show_default=True,
              help="HOST:PORT for inbound SMTP ('[::1]:25' for IPv6).")
@click.option("--hostname", default=None, help="Name in the banner (default: this host's FQDN).")
@click.option("--max-size", default=10 * 1024 * 1024, show_default=True, type=int,
              help="Largest message in octets (0: no limit).")
def serve(listen: str, hostname: str | None, max_size: int) -> None:
    """Run an SMTP edge that accepts mail into an in-memory queue and logs each message.

    Until the daemon with its YAML config lands, this is a way to try the
    edge: nothing is stored on disk or delivered.
    """
    from slimta.app.memory_queue import LoggingMemoryQueue
    from slimta.edge.smtp import SmtpEdge

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    edge = SmtpEdge((host, int(port)), LoggingMemoryQueue(), hostname=hostname, max_size=max_size)
    edge.start()
    click.echo(f"slimta {slimta.__version__}: SMTP on {listen} (in-memory queue; Ctrl-C stops)")
    slimta.run_forever()


main.add_command(queue)
main.add_command(send)
