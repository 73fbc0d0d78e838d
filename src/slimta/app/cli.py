"""The ``slimta`` command: ``serve``, ``check``, ``config init``, ``queue`` and ``send``.

Exit codes: 0 success; 1 an invalid config, a listener that cannot be bound
or a file that would be overwritten; 2 a usage error (click's).
"""

from __future__ import annotations

import asyncio
import logging
import logging.config
import os
import signal
import sys
from importlib import resources

import click

import slimta
from slimta.app.process import Process, ProcessError, setup_logging, stop_within
from slimta.app.queuecli import queue
from slimta.app.send import send

__all__ = ["DEFAULT_CONFIG_NAME", "default_config_text", "load", "main"]

#: The file name ``slimta config init`` writes.
DEFAULT_CONFIG_NAME = "slimta.yaml"

log = logging.getLogger("slimta.app")


def default_config_text() -> str:
    """The embedded default config (``slimta/app/default.yaml``), comments included."""
    return resources.files("slimta.app").joinpath("default.yaml").read_text("utf-8")


def load(path: str | None):
    """The config in ``path``, or the embedded default (with no path: relative to the cwd)."""
    from slimta.app.config import load_config

    if path is not None:
        return load_config(path)
    with resources.as_file(resources.files("slimta.app").joinpath("default.yaml")) as default:
        config = load_config(default)
    config._path = None
    return config


def _config_error(exc: Exception) -> None:
    click.echo(f"slimta: invalid config:\n{exc}", err=True)
    sys.exit(1)


@click.group(invoke_without_command=True)
@click.version_option(slimta.__version__, prog_name="slimta")
@click.pass_context
def main(ctx: click.Context) -> None:
    """slimta: a mail transfer agent on asyncio."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


_CONFIG_OPTION = click.option(
    "-c", "--config", "config_file", type=click.Path(dir_okay=False, exists=True),
    help="The YAML config (default: the embedded default; see `slimta config init`).")


def _apply_overrides(config, listen: tuple[str, ...], hostname: str | None,
                     max_size: int | None, admin: str | None, data_dir: str | None) -> None:
    from slimta.app.config import AdminConfig, Listener, SmtpEdgeConfig

    smtp = [name for name, edge in config.edge.items() if isinstance(edge, SmtpEdgeConfig)]
    for value in listen:
        name, sep, address = value.rpartition("=")
        if not sep:
            if not smtp:
                raise click.UsageError("--listen: the config has no SMTP edge")
            name = smtp[0]
        if name not in config.edge:
            raise click.UsageError(f"--listen: no edge named {name!r} ({', '.join(config.edge)})")
        try:
            config.edge[name].listener = [Listener.model_validate(address)]
        except ValueError as exc:
            raise click.UsageError(f"--listen {value}: {exc}") from None
    for name in smtp:
        if hostname is not None:
            config.edge[name].hostname = hostname
        if max_size is not None:
            config.edge[name].max_size = max_size
    settings = config.process.setdefault("slimta", config.process_settings())
    if admin is not None:
        try:
            settings.admin = AdminConfig(listener=Listener.model_validate(admin),
                                         token=settings.admin.token if settings.admin else None)
        except ValueError as exc:
            raise click.UsageError(f"--admin {admin}: {exc}") from None
    if data_dir is not None:
        settings.data_dir = os.path.abspath(data_dir)


def _where(listener) -> str:
    return _host_port(listener.interface, listener.port)


def _host_port(host: str, port: int) -> str:
    host = host or "*"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _run(app, proc=None, again=None, no_edge: bool = False,
               no_relay: bool = False, worker=None) -> None:
    from slimta.app.reload import Reloader

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloader = Reloader(app, again or (lambda: app.config), stopping.set,
                        no_edge=no_edge, no_relay=no_relay)
    loop.add_signal_handler(signal.SIGHUP, reloader.request)
    try:
        app.start()
    except OSError as exc:
        await app.stop()
        click.echo(f"slimta: cannot listen: {exc}", err=True)
        sys.exit(1)
    try:
        await app.started()
    except Exception as exc:  # a queue file that cannot be opened, ...
        log.debug("start failed", exc_info=True)
        await app.stop()
        click.echo(f"slimta: cannot start: {exc}", err=True)
        sys.exit(1)
    try:  # the pid file, then user/group (after binding and opening the data dir)
        if proc is not None:
            proc.started()
    except (OSError, ProcessError) as exc:
        await app.stop()
        click.echo(f"slimta: cannot start: {exc}", err=True)
        sys.exit(1)
    if worker is not None:  # the supervisor printed where it listens
        worker.watch_supervisor(stopping.set)
        worker.notify_ready()
        log.info("serving")
    for name in app.edges if worker is None else ():
        spec = app.config.edge[name]
        where = ", ".join(_where(x) for x in getattr(spec, "listener", []))
        kind = spec.type.upper() if spec.type in ("smtp", "http") else f"{spec.type} edge"
        click.echo(f"slimta {slimta.__version__}: {name}: {kind} on {where} -> queue {spec.queue}")
    if app.admin is not None and worker is None:
        host, port = app.admin.address[:2]
        click.echo(f"slimta: admin/metrics on http://{host}:{port}/metrics")
    if worker is None:
        click.echo(f"slimta: data in {app.data_dir} (SIGTERM or Ctrl-C stops)", nl=True)
        sys.stdout.flush()
    await stopping.wait()
    log.info("stopping")
    await reloader.finish()
    app = reloader.app
    await stop_within(app, app.config.process_settings().shutdown_timeout)


@main.command()
@_CONFIG_OPTION
@click.option("--no-edge", is_flag=True, help="No edges: only deliver what the queues hold.")
@click.option("--no-relay", is_flag=True, help="No relays: the queues only store (edge only).")
@click.option("--listen", multiple=True, metavar="[EDGE=]HOST:PORT",
              help="Where an SMTP edge listens (default edge: the first; '[::1]:25' for IPv6). "
                   "Repeatable.")
@click.option("--hostname", default=None, help="Name in the SMTP edges' banners.")
@click.option("--max-size", default=None, type=int,
              help="Largest message in octets for every SMTP edge (0: no limit).")
@click.option("--admin", "admin_listen", default=None, metavar="HOST:PORT",
              help="Where the admin/metrics endpoint listens.")
@click.option("--data-dir", default=None, type=click.Path(file_okay=False),
              help="The data directory (default: process.slimta.data_dir, $SLIMTA_DATA_DIR, "
                   "./slimta-data).")
@click.option("--workers", default=None, type=click.IntRange(1, 256),
              help="Worker processes sharing the listeners, under a supervisor "
                   "(default: process.slimta.workers, 1: no supervisor).")
def serve(config_file: str | None, no_edge: bool, no_relay: bool, listen: tuple[str, ...],
          hostname: str | None, max_size: int | None, admin_listen: str | None,
          data_dir: str | None, workers: int | None) -> None:
    """Run the MTA the config describes (without -c: the embedded default).

    The embedded default accepts mail for @localhost on 127.0.0.1:1025 into
    Maildirs in the data directory, submission with AUTH on 127.0.0.1:1587
    (a user is made and printed at the first start) relayed by MX, and
    serves metrics on http://127.0.0.1:8025/metrics.
    """
    from slimta.app import build as B
    from slimta.app import workers as W
    from slimta.app.build import build, data_dir_of, ensure_first_user
    from slimta.app.config import ConfigError

    # a process started by the supervisor of --workers N (see slimta.app.workers)
    worker = W.WorkerContext.from_environ()
    try:
        config = load(config_file)
    except ConfigError as exc:
        _config_error(exc)
    _apply_overrides(config, listen, hostname, max_size, admin_listen, data_dir)
    setup_logging(config.process_settings())
    count = workers or config.process_settings().workers

    def again():  # SIGHUP: the config file again, with this command line's overrides
        new = load(config_file)
        _apply_overrides(new, listen, hostname, max_size, admin_listen, data_dir)
        return new

    if worker is not None:
        W.tag_logs(worker.number)
        B.worker = worker
        try:
            app = build(config, no_edge=no_edge, no_relay=no_relay)
        except ConfigError as exc:
            _config_error(exc)
        # the supervisor wrote the pid file and dropped privileges
        asyncio.run(_run(app, None, again, no_edge, no_relay, worker))
        return
    if count > 1:
        W.tag_logs(0)
    proc = Process(config.process_settings(), data_dir_of(config))
    try:
        proc.check()
    except ProcessError as exc:
        click.echo(f"slimta: cannot start: {exc}", err=True)
        sys.exit(1)
    try:
        app = build(config, no_edge=no_edge, no_relay=no_relay)
    except ConfigError as exc:
        _config_error(exc)
    if not no_edge:
        try:
            first = ensure_first_user(config)
        except OSError as exc:
            click.echo(f"slimta: cannot start: {exc}", err=True)
            sys.exit(1)
        if first is not None:
            user, password, path = first
            click.echo(f"slimta: created the submission user {user} with password {password}\n"
                       f"        (shown only now; its hash is in {path})")
    for orphan in W.orphan_queue_files(config, count):
        log.warning("%s: a queue file of another number of workers (process.slimta.workers): "
                    "its mail waits until such a process runs", orphan)
    if count > 1:
        _supervise(config, count, proc, again, no_edge, fixed_count=workers is not None)
        return
    try:
        asyncio.run(_run(app, proc, again, no_edge, no_relay))
    finally:
        proc.close()


def _supervise(config, count: int, proc: Process, again, no_edge: bool,
               fixed_count: bool) -> None:
    """``serve`` with ``count`` workers: bind, pid file and user, then run the supervisor."""
    from slimta.app import workers as W
    from slimta.app.build import data_dir_of

    settings = config.process_settings()
    try:
        sockets = W.bind_listeners(W.smtp_listeners(config, no_edge))
    except OSError as exc:
        click.echo(f"slimta: cannot listen: {exc}", err=True)
        sys.exit(1)
    try:  # the pid file names the supervisor; the workers inherit the user/group
        proc.started()
    except (OSError, ProcessError) as exc:
        for sock in sockets.values():
            sock.close()
        click.echo(f"slimta: cannot start: {exc}", err=True)
        sys.exit(1)
    code = 1
    try:
        for name, spec in config.edge.items():
            found = [sockets[(x.interface, x.port)] for x in getattr(spec, "listener", [])
                     if (x.interface, x.port) in sockets]
            if found:
                where = ", ".join(_host_port(*s.getsockname()[:2]) for s in found)
                click.echo(f"slimta {slimta.__version__}: {name}: {spec.type.upper()} on {where} "
                           f"-> queue {spec.queue} ({count} workers)")
        if settings.admin is not None and settings.admin.listener.port:
            admin = settings.admin.listener
            click.echo(f"slimta: admin/metrics of worker i on "
                       f"http://{admin.interface or '127.0.0.1'}:{admin.port}+i-1/metrics "
                       f"(ports {admin.port}-{admin.port + count - 1})")
        click.echo(f"slimta: data in {data_dir_of(config)} (SIGTERM or Ctrl-C stops)")
        sys.stdout.flush()
        supervisor = W.Supervisor(count, W.worker_command(), sockets, again, no_edge=no_edge,
                                  shutdown_timeout=settings.shutdown_timeout,
                                  fixed_count=fixed_count)
        code = asyncio.run(supervisor.run())
    finally:
        proc.close()
    sys.exit(code)


@main.command()
@_CONFIG_OPTION
def check(config_file: str | None) -> None:
    """Validate a config and print it resolved (includes, variables, defaults), secrets masked.

    Exits 1 with each problem (file:line: key: message) on stderr when invalid.
    """
    from slimta.app.build import build
    from slimta.app.config import ConfigError

    try:
        config = load(config_file)
        build(config)
    except ConfigError as exc:
        _config_error(exc)
    click.echo(config.dump_masked(), nl=False)
    click.echo(f"slimta: {config_file or 'the embedded default'}: OK", err=True)


@main.group("config")
def config_group() -> None:
    """Write and inspect config files."""


@config_group.command("init")
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing slimta.yaml.")
def config_init(directory: str, force: bool) -> None:
    """Write the embedded default as DIRECTORY/slimta.yaml (default: here), with comments."""
    path = os.path.join(directory, DEFAULT_CONFIG_NAME)
    if os.path.exists(path) and not force:
        click.echo(f"slimta: {path} exists; --force overwrites it", err=True)
        sys.exit(1)
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(default_config_text())
    click.echo(f"wrote {path}; check it with: slimta check -c {path}")


main.add_command(queue)
main.add_command(send)
