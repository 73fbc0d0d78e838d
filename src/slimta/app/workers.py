"""``slimta serve --workers N``: a supervisor and N worker processes on shared listening sockets.

The supervisor binds every SMTP and HTTP edge listener once, writes the pid file,
drops privileges, and then runs N copies of ``slimta serve`` (the same
command line) as worker processes. Each worker inherits the listening
sockets (``pass_fds``; their ``interface:port`` → descriptor map is in the
environment variable :data:`ENV_VAR`, with the number of the worker) and
builds its edges on them instead of binding (:data:`slimta.app.build.worker`).
All workers accept from the same kernel queue, so a connection waits in the
backlog while a worker restarts, and no port is bound twice.

Why inherited sockets rather than ``SO_REUSEPORT``: with ``SO_REUSEPORT``
every worker binds its own socket, the kernel hashes each connection to one
of them, and the connections waiting in a crashed worker's backlog are
reset; a restarted worker would also need the privilege to bind again (port
25). With one inherited socket an idle worker takes the next connection
and nothing waiting is lost.

Per worker:

- SQLite queues: worker *i* owns ``<stem>.<i><suffix>`` (``queue.db`` →
  ``queue.1.db``, ``queue.2.db``, …), and a restarted worker *i* reopens
  its file, so its queued mail is delivered. ``memory`` queues are each
  worker's own. Storages shared by several hosts (PostgreSQL, Redis) are
  used unchanged by every worker: only :class:`SqliteQueueConfig` paths
  are rewritten (:meth:`WorkerContext.queue_path`).
- The admin/metrics endpoint of worker *i* listens on the configured port
  + *i* - 1 (each worker reports its own edges and queues).
- Log records carry ``worker`` (the number; 0 is the supervisor): the text
  format shows ``[worker 2]`` / ``[supervisor]``, the JSON format a
  ``"worker"`` field.

The supervisor restarts a worker that ended unexpectedly (at once, then
after a growing delay while it keeps failing within :data:`MIN_UPTIME` of
starting), passes SIGTERM/SIGINT (graceful stop; it exits 0 once every
worker has stopped) and SIGHUP (each worker reloads its config) on to the
workers. A reload that adds or removes an SMTP listener is done by the
supervisor: it binds the new sockets and replaces the workers one at a
time. A worker whose supervisor died stops by itself (it watches a pipe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mmap
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "MIN_UPTIME", "Supervisor", "WorkerContext", "bind_listeners",
           "orphan_queue_files", "per_worker_path", "restart_delay", "smtp_listeners",
           "tag_logs", "worker_command"]

log = logging.getLogger("slimta.app.workers")

#: The environment variable that makes ``slimta serve`` a worker (JSON, see :meth:`Supervisor`).
ENV_VAR = "SLIMTA_WORKER"
#: A worker that ends sooner than this (seconds) after it started failed "at once".
MIN_UPTIME = 10.0
#: The longest wait before restarting a worker that keeps failing.
MAX_RESTART_DELAY = 60.0
#: How long (seconds) a worker with more open connections than another leaves a new
#: connection to the others before it takes it itself.
LEAVE_FOR = 0.02
#: A worker's slot in the shared connection counts while it is not running.
_DOWN = 0xFFFFFFFF
#: The default text log of a process of ``--workers N``.
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(_worker_label)s] %(name)s %(message)s"

Address = tuple[str, int]


def per_worker_path(path: str, number: int) -> str:
    """Worker ``number``'s SQLite file for ``path``: ``queue.db`` gives ``queue.2.db``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{number}{p.suffix}"))


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker that failed ``failures`` times in a row at once."""
    if failures <= 0:
        return 0.1
    return min(MAX_RESTART_DELAY, 2.0 ** (failures - 1))


def _where(address: Address) -> str:
    host = address[0] or "*"
    return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"


# --- the worker's side -----------------------------------------------------------

class _Counts:
    """The open connections of each worker, in memory shared with the supervisor."""

    def __init__(self, fd: int, count: int, number: int):
        self._mem = mmap.mmap(fd, 4 * count)
        os.close(fd)
        self._slots = memoryview(self._mem).cast("I")
        self._mine = number - 1
        self._slots[self._mine] = 0

    def mine(self) -> int:
        return self._slots[self._mine]

    def fewest_elsewhere(self) -> int:
        others = [v for i, v in enumerate(self._slots) if i != self._mine]
        return min(others, default=_DOWN)

    def add(self, n: int) -> None:
        self._slots[self._mine] = max(0, self._slots[self._mine] + n)


class _Counted(socket.socket):
    """An accepted connection that counts itself out of :class:`_Counts` when closed."""

    _counts: _Counts | None = None

    def close(self) -> None:
        counts, self._counts = self._counts, None
        if counts is not None:
            counts.add(-1)
        super().close()


class _OneAtATime(socket.socket):
    """A listening socket that spreads new connections evenly over the workers.

    asyncio accepts in a loop until the kernel queue is empty, so the worker
    that wakes first would take a whole burst of new connections (20 arriving
    at once: 15 for one worker, 5 for the other), and a busy worker as many as
    an idle one. So a worker takes one connection per wake-up of its loop, and
    while it has more open connections than another worker it leaves new ones
    to the others for up to :data:`LEAVE_FOR` seconds (the counts are in
    memory shared by the workers, :class:`_Counts`). Every worker is woken
    by a waiting connection, so the one with the fewest takes it.
    """

    counts: _Counts | None = None  # one per process: set by WorkerContext.from_environ
    _took = False
    _leaving: float | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self._took:
            self._took = False
            raise BlockingIOError("one connection per wake-up")
        counts = self.counts
        if counts is not None and counts.mine() > counts.fewest_elsewhere():
            now = time.monotonic()
            if self._leaving is None:
                self._leaving = now
            if now - self._leaving < LEAVE_FOR:
                raise BlockingIOError("left to a worker with fewer connections")
        self._leaving = None
        fd, address = self._accept()  # as socket.accept(), with a counted socket
        conn = _Counted(self.family, self.type, self.proto, fileno=fd)
        if socket.getdefaulttimeout() is None and self.gettimeout():
            conn.setblocking(True)
        if counts is not None:
            conn._counts = counts
            counts.add(1)
        self._took = True
        return conn, address


@dataclass
class WorkerContext:
    """What a worker process got from its supervisor (see :data:`slimta.app.build.worker`).

    ``sockets`` maps an SMTP listener's configured ``(interface, port)`` to the
    listening socket the supervisor bound; ``ready`` is the descriptor to write
    to once the worker serves; ``lifeline`` the one that reaches end of file
    when the supervisor is gone.
    """

    number: int
    count: int
    sockets: dict[Address, socket.socket] = field(default_factory=dict)
    ready: int | None = None
    lifeline: int | None = None

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> WorkerContext | None:
        """The context in :data:`ENV_VAR` (removed, so that child programs do not see it)."""
        environ = os.environ if environ is None else environ
        text = environ.pop(ENV_VAR, None)
        if not text:
            return None
        data = json.loads(text)
        sockets: dict[Address, socket.socket] = {
            (str(host), int(port)): _OneAtATime(fileno=int(fd))
            for host, port, fd in data.get("listeners", [])}
        if data.get("counts") is not None:
            _OneAtATime.counts = _Counts(int(data["counts"]), int(data["count"]),
                                         int(data["number"]))
        return cls(int(data["number"]), int(data["count"]), sockets,
                   data.get("ready"), data.get("lifeline"))

    def listener(self, interface: str, port: int) -> socket.socket:
        """A duplicate of the inherited socket for ``interface:port`` (each edge closes its own)."""
        sock = self.sockets.get((interface, port))
        if sock is None:
            raise ValueError(f"listener {_where((interface, port))} was not bound by the "
                             "supervisor (it binds the listeners of the config it read last)")
        return sock.dup()

    def queue_path(self, path: str) -> str:
        """This worker's SQLite file for the configured ``path``."""
        return per_worker_path(path, self.number)

    def admin_port(self, port: int) -> int:
        """This worker's admin port: the configured one + number - 1 (0 stays 0: any port)."""
        return port + self.number - 1 if port else 0

    def notify_ready(self) -> None:
        """Tell the supervisor that this worker serves."""
        if self.ready is None:
            return
        with contextlib.suppress(OSError):
            os.write(self.ready, b"ready\n")
        with contextlib.suppress(OSError):
            os.close(self.ready)
        self.ready = None

    def watch_supervisor(self, gone: Callable[[], None]) -> None:
        """Call ``gone()`` (in the running loop) when the supervisor has ended."""
        if self.lifeline is None:
            return
        loop = asyncio.get_running_loop()
        fd = self.lifeline

        def readable() -> None:
            try:
                data = os.read(fd, 64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                log.warning("the supervisor is gone: stopping")
                gone()

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)


class _Tagged(logging.Formatter):
    """The default text log with the process's place: ``[worker 2]`` or ``[supervisor]``."""


def tag_logs(number: int) -> None:
    """Give every log record of this process ``worker`` = ``number`` (0: the supervisor).

    The default text handler (see :func:`slimta.app.process.setup_logging`) is
    switched to :data:`TEXT_FORMAT`; a ``logging`` dictConfig can use
    ``%(worker)s``; the JSON format writes it as a field.
    """
    from slimta.app.process import TEXT_FORMAT as PLAIN

    label = f"worker {number}" if number else "supervisor"
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.worker = number
        record._worker_label = label
        return record

    logging.setLogRecordFactory(factory)
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if formatter is not None and getattr(formatter, "_fmt", None) == PLAIN:
            handler.setFormatter(_Tagged(TEXT_FORMAT))


# --- the supervisor's side -------------------------------------------------------

def smtp_listeners(config: Any, no_edge: bool = False) -> dict[Address, int]:
    """The ``(interface, port)`` of every SMTP and HTTP edge listener in ``config``, with its
    backlog."""
    from slimta.app.config import HttpEdgeConfig, SmtpEdgeConfig

    found: dict[Address, int] = {}
    if no_edge:
        return found
    for spec in config.edge.values():
        if isinstance(spec, SmtpEdgeConfig | HttpEdgeConfig):
            for listener in spec.listener:
                found[(listener.interface, listener.port)] = spec.backlog
    return found


def bind_listeners(wanted: dict[Address, int], have: dict[Address, socket.socket] | None = None
                   ) -> dict[Address, socket.socket]:
    """Sockets for ``wanted``: those in ``have`` kept, the others bound (``OSError`` if one fails).

    On failure the sockets bound here are closed again; ``have`` is untouched.
    """
    from slimta.util.listeners import bind_listener

    have = have or {}
    out: dict[Address, socket.socket] = {}
    made: list[socket.socket] = []
    try:
        for address, backlog in wanted.items():
            if address in have:
                out[address] = have[address]
            else:
                sock = bind_listener(address, backlog)
                made.append(sock)
                out[address] = sock
    except OSError as exc:
        for sock in made:
            sock.close()
        raise OSError(exc.errno, f"{_where(address)}: {exc.strerror or exc}") from exc
    return out


def orphan_queue_files(config: Any, count: int) -> list[str]:
    """SQLite queue files that no process of ``count`` workers opens (e.g. after ``N`` shrank).

    With 1 worker: every ``<stem>.<i><suffix>``; with more: the plain file and
    those of workers above ``count``. Their mail waits until a process of the
    matching shape runs again (``slimta queue --db`` still reads them).
    """
    from slimta.app.build import data_dir_of
    from slimta.app.config import SqliteQueueConfig
    from slimta.app.queuecli import worker_queue_files

    data_dir = data_dir_of(config)
    found: list[str] = []
    for name, spec in config.queue.items():
        if not isinstance(spec, SqliteQueueConfig):
            continue
        base = os.path.join(data_dir, os.path.expanduser(spec.path or f"{name}.db"))
        if count > 1 and os.path.exists(base):
            found.append(base)
        owned = {per_worker_path(base, i) for i in range(1, count + 1)} if count > 1 else set()
        found += [f for f in worker_queue_files(base) if f not in owned]
    return found


def worker_command(argv: Iterable[str] | None = None) -> list[str]:
    """A worker's command line: this Python running ``slimta`` with ``argv`` (default: ours)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [sys.executable, "-c", "from slimta.app.cli import main; main()", *args]


@dataclass
class _Worker:
    number: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: asyncio.Future | None = None
    lifeline: int | None = None
    waiter: asyncio.Task | None = None
    restart: asyncio.TimerHandle | None = None
    stopping: bool = False
    failures: int = 0  # ends in a row within MIN_UPTIME of starting
    reload: bool = False  # a SIGHUP for when it is ready (before, it would kill it)


class Supervisor:
    """Runs ``count`` workers (``command``) over ``sockets`` and keeps them running.

    ``load()`` re-reads the config at SIGHUP (raising on an invalid one);
    ``no_edge`` is the ``--no-edge`` of the command line; ``fixed_count``: the
    count came from ``--workers``, not from the config. :meth:`run` returns
    the exit status: 0 after a stop by signal, 1 when a worker could not
    start the first time.

    The environment variable :data:`ENV_VAR` given to worker *i* is JSON:
    ``{"number": i, "count": N, "listeners": [[interface, port, fd], ...],
    "ready": fd, "lifeline": fd, "counts": fd}`` (``counts``: shared memory
    holding each worker's open connections as 32-bit integers).
    """

    def __init__(self, count: int, command: list[str], sockets: dict[Address, socket.socket],
                 load: Callable[[], Any], *, no_edge: bool = False,
                 shutdown_timeout: float = 30.0, fixed_count: bool = False) -> None:
        self.count = count
        self.fixed_count = fixed_count
        self.command = command
        self.sockets = dict(sockets)
        self.load = load
        self.no_edge = no_edge
        self.shutdown_timeout = shutdown_timeout
        self.workers = [_Worker(i) for i in range(1, count + 1)]
        self._up = False
        self._stopping: asyncio.Event | None = None
        self._reload_task: asyncio.Task | None = None
        self._reload_again = False
        self._tasks: set[asyncio.Task] = set()
        # each worker's open connections, for spreading new ones (see _OneAtATime)
        self._counts_fd = os.memfd_create("slimta-workers")
        os.ftruncate(self._counts_fd, 4 * count)
        self._counts = memoryview(mmap.mmap(self._counts_fd, 4 * count)).cast("I")
        for i in range(count):
            self._counts[i] = _DOWN

    # --- lifecycle -----------------------------------------------------------
    async def run(self) -> int:
        """Start the workers, supervise them until SIGTERM/SIGINT, stop them; the exit status."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_requested, sig)
        loop.add_signal_handler(signal.SIGHUP, self._hup)
        try:
            for worker in self.workers:
                await self._spawn(worker)
            if not await self._all_ready():
                log.error("a worker could not start: stopping the others")
                await self._stop_all()
                return 1
            self._up = True
            if not self._stopping.is_set():
                log.info("%d workers ready (pids %s)", self.count,
                         ", ".join(str(pid) for pid in self.pids().values()))
            await self._stopping.wait()
            log.info("stopping the workers")
            await self._stop_all()
            log.info("all workers stopped")
            return 0
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for sock in self.sockets.values():
                sock.close()
            os.close(self._counts_fd)

    def pids(self) -> dict[int, int]:
        """The process id of each running worker, by worker number."""
        return {w.number: w.process.pid for w in self.workers
                if w.process is not None and w.process.returncode is None}

    def _stop_requested(self, sig: signal.Signals) -> None:
        assert self._stopping is not None
        if not self._stopping.is_set():
            log.info("%s: stopping", signal.Signals(sig).name)
        self._stopping.set()

    async def _all_ready(self) -> bool:
        assert self._stopping is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                readies = [w.ready for w in self.workers if w.ready is not None]
                if any(f.done() and not f.result() for f in readies):
                    return False
                pending = [f for f in readies if not f.done()]
                if not pending:
                    return True
                await asyncio.wait([*pending, stop], return_when=asyncio.FIRST_COMPLETED)
            return True
        finally:
            stop.cancel()

    async def _stop_all(self) -> None:
        for worker in self.workers:
            worker.stopping = True
            if worker.restart is not None:
                worker.restart.cancel()
            self._signal(worker, signal.SIGTERM)
        if self._reload_task is not None:
            with contextlib.suppress(Exception):
                await self._reload_task
        waiters = [w.waiter for w in self.workers if w.waiter is not None]
        if not waiters:
            return
        # each worker bounds its own stop by shutdown_timeout; this is for one that hangs
        _, late = await asyncio.wait(waiters, timeout=self.shutdown_timeout + 15)
        if late:
            for worker in self.workers:
                if worker.waiter in late:
                    log.warning("worker %d did not stop in time: killing it", worker.number)
                    self._signal(worker, signal.SIGKILL)
            await asyncio.wait(late)

    @staticmethod
    def _signal(worker: _Worker, sig: signal.Signals) -> None:
        proc = worker.process
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # --- one worker ----------------------------------------------------------
    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.restart = None
        ready_r, ready_w = os.pipe()
        life_r, life_w = os.pipe()
        listeners = [[host, port, sock.fileno()] for (host, port), sock in self.sockets.items()]
        env = dict(os.environ)
        env[ENV_VAR] = json.dumps({"number": worker.number, "count": self.count,
                                   "listeners": listeners, "ready": ready_w,
                                   "lifeline": life_r, "counts": self._counts_fd})
        fds = (*(fd for _, _, fd in listeners), ready_w, life_r, self._counts_fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.DEVNULL, env=env, pass_fds=fds)
        except OSError as exc:
            os.close(ready_r)
            os.close(life_w)
            log.error("cannot start worker %d: %s", worker.number, exc)
            worker.ready = loop.create_future()
            worker.ready.set_result(False)
            if self._up:
                self._schedule_restart(worker, f"it could not be started ({exc})")
            return
        finally:
            os.close(ready_w)
            os.close(life_r)
        worker.process = proc
        worker.started = loop.time()
        worker.lifeline = life_w
        ready = worker.ready = loop.create_future()
        log.info("worker %d started (pid %d)", worker.number, proc.pid)

        def readable() -> None:
            try:
                data = os.read(ready_r, 64)
            except OSError:
                data = b""
            loop.remove_reader(ready_r)
            os.close(ready_r)
            if not ready.done():
                ready.set_result(bool(data))
            if data:
                log.info("worker %d (pid %d) ready", worker.number, proc.pid)
                if worker.reload:
                    worker.reload = False
                    self._signal(worker, signal.SIGHUP)

        loop.add_reader(ready_r, readable)
        worker.waiter = loop.create_task(self._watch(worker, proc))
        if worker.stopping and self._stopping is not None and self._stopping.is_set():
            self._signal(worker, signal.SIGTERM)

    async def _watch(self, worker: _Worker, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        self._counts[worker.number - 1] = _DOWN
        loop = asyncio.get_running_loop()
        uptime = loop.time() - worker.started
        if worker.lifeline is not None:
            os.close(worker.lifeline)
            worker.lifeline = None
        how = f"exit status {code}" if code >= 0 else f"killed by {_signame(-code)}"
        if worker.stopping:
            log.info("worker %d (pid %d) stopped (%s)", worker.number, proc.pid, how)
            return
        if not self._up:
            log.error("worker %d (pid %d) ended while starting (%s)", worker.number, proc.pid,
                      how)
            return
        if code == 0 and self._stopping is not None and not self._stopping.is_set():
            # Ctrl-C (or a kill of the process group) may reach a worker before us
            await asyncio.sleep(0.5)
        if self._stopping is not None and self._stopping.is_set():
            return
        worker.failures = worker.failures + 1 if uptime < MIN_UPTIME else 0
        self._schedule_restart(worker, f"pid {proc.pid} ended after {uptime:.1f}s, {how}")

    def _schedule_restart(self, worker: _Worker, why: str) -> None:
        loop = asyncio.get_running_loop()
        delay = restart_delay(worker.failures)
        again = (f"; it failed {worker.failures} times in a row within {MIN_UPTIME:g}s "
                 "of starting" if worker.failures > 1 else "")
        log.warning("worker %d: %s; restarting it in %gs%s", worker.number, why, delay, again)

        def restart() -> None:
            worker.restart = None
            if not worker.stopping:
                task = loop.create_task(self._spawn(worker))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        worker.restart = loop.call_later(delay, restart)

    # --- SIGHUP --------------------------------------------------------------
    def _hup(self) -> None:
        log.info("SIGHUP: reloading the config")
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            try:
                await self._reload_once()
            except Exception:
                log.exception("reload failed")
            if not self._reload_again or (self._stopping and self._stopping.is_set()):
                return

    async def _reload_once(self) -> None:
        try:
            config = self.load()
        except Exception as exc:
            log.error("reload failed, the workers keep the old config: %s", exc)
            return
        workers = config.process_settings().workers
        if not self.fixed_count and workers != self.count:
            log.warning("process.slimta.workers is now %d: the number of workers changes "
                        "only at a restart (running %d)", workers, self.count)
        wanted = smtp_listeners(config, self.no_edge)
        if set(wanted) == set(self.sockets):
            for worker in self.workers:
                if worker.ready is not None and worker.ready.done() and worker.ready.result():
                    self._signal(worker, signal.SIGHUP)
                else:  # starting: it may have read the old file already
                    worker.reload = True
            log.info("SIGHUP passed on to the workers")
            return
        try:
            sockets = bind_listeners(wanted, self.sockets)
        except OSError as exc:
            log.error("reload failed, the workers keep the old config: cannot listen: %s", exc)
            return
        gone = {a: s for a, s in self.sockets.items() if a not in sockets}
        added = [a for a in sockets if a not in self.sockets]
        self.sockets = sockets
        log.info("the SMTP listeners changed (new: %s; gone: %s): replacing the workers one "
                 "at a time", ", ".join(map(_where, added)) or "none",
                 ", ".join(map(_where, gone)) or "none")
        for worker in self.workers:
            if self._stopping is not None and self._stopping.is_set():
                break
            await self._replace(worker)
        for sock in gone.values():
            sock.close()

    async def _replace(self, worker: _Worker) -> None:
        """Stop ``worker`` gracefully, then start it again with the current sockets."""
        if worker.restart is not None:
            worker.restart.cancel()
            worker.restart = None
        if worker.process is not None and worker.process.returncode is None:
            worker.stopping = True
            self._signal(worker, signal.SIGTERM)
            if worker.waiter is not None:
                await worker.waiter
        if self._stopping is not None and self._stopping.is_set():
            return
        worker.stopping = False
        worker.failures = 0
        await self._spawn(worker)
        if worker.ready is not None and not await worker.ready:
            log.error("worker %d did not start with the new config", worker.number)


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
