"""``slimta queue``: look at and manage a queue, as ``postqueue``/``postsuper`` do for Postfix.

The commands talk to a :class:`QueueClient`. :class:`SqliteQueueClient` works
directly on the SQLite file of a :class:`~slimta.queue.sqlite.SqliteStorage`
whose daemon is stopped; :class:`AdminQueueClient` works on a queue of a
running daemon through its admin endpoint (:mod:`slimta.app.admin`).
:class:`MultiQueueClient` joins several of them into one: the per-worker
files of ``slimta serve --workers N`` (``--db queue.db`` finds ``queue.1.db``,
``queue.2.db``, ... beside it) or the workers' endpoints (``--admin URL,URL``).

One process uses a queue file at a time (see :mod:`slimta.queue.sqlite`), and
a running daemon keeps its schedule in memory: a change made behind its back
would be ignored or undone. So :class:`SqliteQueueClient` refuses to change a
file that another process has open (it sees SQLite's lock on the ``-shm``
file); reading (``list``, ``show``, ``stats``) is safe at any time.

JSON output (``--json``), times in seconds since the epoch:

``list``
    ``[{"id", "size", "arrival", "sender", "recipients" (not yet delivered),
    "attempts", "next_attempt", "last_reply", "held"}, ...]``, by next attempt.
``show``
    ``{"id", "size", "arrival", "sender", "recipients" (all), "pending",
    "delivered", "attempts", "next_attempt", "last_reply", "held",
    "history" (``[[time the attempt ended, reply], ...]``, oldest first, the
    last attempts only), "envelope" (the stored metadata, see
    :mod:`slimta.queue.record`),
    "message"}``; ``message`` is the raw message as text, or ``null`` with
    ``"message_base64"`` when it is not UTF-8.
``retry``, ``hold``, ``release``, ``delete``, ``flush``
    ``{"done": [ids], "missing": [ids]}``.
``stats``
    ``{"messages", "held", "recipients", "bytes"}`` (through the admin endpoint
    also ``"attempting"``, the deliveries in progress).
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import json
import os
import re
import sqlite3
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click

from slimta.queue.storage import QueueEntry

__all__ = [
    "EXIT_MISSING",
    "EXIT_OK",
    "EXIT_USAGE",
    "AdminQueueClient",
    "BatchResult",
    "MessageDetail",
    "MultiQueueClient",
    "QueueBusyError",
    "QueueClient",
    "QueueUnavailableError",
    "SqliteQueueClient",
    "StorageQueueClient",
    "queue",
    "queue_file_in_use",
    "worker_queue_files",
]

#: Everything was done.
EXIT_OK = 0
#: At least one id was not found (the others were still processed).
EXIT_MISSING = 1
#: Bad arguments, or the queue cannot be used (no such file, in use by a daemon, ...).
EXIT_USAGE = 2

#: Ids handled per step of a bulk operation (one transaction with SqliteStorage).
BATCH = 500

Progress = Callable[[int, int], None]


class QueueUnavailableError(Exception):
    """The queue cannot be opened or used (missing, not a slimta queue, unreadable)."""


class QueueBusyError(QueueUnavailableError):
    """The queue file is open in another process (a running daemon): changes are refused."""


@dataclass
class BatchResult:
    """The outcome of an operation on several ids: those done and those not found."""

    done: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"done": self.done, "missing": self.missing}


@dataclass
class MessageDetail:
    """One queued message for ``show``: its state, stored metadata and raw bytes."""

    id: str
    envelope: dict[str, Any]  # the stored metadata (slimta.queue.record format)
    data: bytes
    delivered: list[int]  # indexes into envelope["recipients"]
    attempts: int
    next_attempt: float
    last_reply: str | None
    held: bool
    #: (when the attempt ended, its reply) of the last attempts, oldest first.
    history: list[tuple[float, str | None]] = field(default_factory=list)

    @property
    def recipients(self) -> list[str]:
        return list(self.envelope.get("recipients") or [])

    @property
    def pending(self) -> list[str]:
        done = set(self.delivered)
        return [r for i, r in enumerate(self.recipients) if i not in done]

    def to_json(self) -> dict[str, Any]:
        done = set(self.delivered)
        out: dict[str, Any] = {
            "id": self.id,
            "size": len(self.data),
            "arrival": self.envelope.get("timestamp"),
            "sender": self.envelope.get("sender"),
            "recipients": self.recipients,
            "pending": self.pending,
            "delivered": [r for i, r in enumerate(self.recipients) if i in done],
            "attempts": self.attempts,
            "next_attempt": self.next_attempt,
            "last_reply": self.last_reply,
            "held": self.held,
            "history": [[t, reply] for t, reply in self.history],
            "envelope": self.envelope,
        }
        try:
            out["message"] = self.data.decode("utf-8")
        except UnicodeDecodeError:
            out["message"] = None
            out["message_base64"] = base64.b64encode(self.data).decode("ascii")
        return out


def entry_to_json(entry: QueueEntry) -> dict[str, Any]:
    """One ``list --json`` item."""
    return {
        "id": entry.id,
        "size": entry.size,
        "arrival": entry.created,
        "sender": entry.sender,
        "recipients": list(entry.recipients),
        "attempts": entry.attempts,
        "next_attempt": entry.next_attempt,
        "last_reply": entry.last_reply,
        "held": entry.held,
    }


class QueueClient(ABC):
    """What the ``slimta queue`` commands need from a queue, wherever it is.

    Use it as ``async with client:``. Operations on several ids process
    every id they can and report the others as missing; ``progress(done,
    total)``, when given, is called as a long operation advances.
    """

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Connect; raises :class:`QueueUnavailableError`."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Disconnect."""

    async def __aenter__(self) -> QueueClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def list(self) -> list[QueueEntry]:
        """Every message, held ones included, by next attempt."""

    @abstractmethod
    async def show(self, id: str) -> MessageDetail:
        """One message; :class:`KeyError` if there is none."""

    @abstractmethod
    async def retry(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        """Make these messages due now."""

    @abstractmethod
    async def hold(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        """Keep these messages without attempting them until released."""

    @abstractmethod
    async def release(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        """Release held messages; they are due now."""

    @abstractmethod
    async def delete(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        """Remove messages without delivering or bouncing them."""

    @abstractmethod
    async def flush(self, progress: Progress | None = None) -> BatchResult:
        """Make every message that is not held due now."""

    @abstractmethod
    async def stats(self) -> dict[str, int]:
        """``{'messages', 'held', 'recipients', 'bytes'}``."""


# SQLite's unix VFS: every connection to a WAL database holds a read lock on
# this byte of the "-shm" file while it is open (the "DMS" lock, os_unix.c).
_SHM_DMS_OFFSET = 128


def queue_file_in_use(path: str | os.PathLike[str]) -> bool:
    """True if another process has the SQLite database ``path`` open.

    Tries a write lock on the byte of the ``-shm`` file that every open WAL
    connection holds a read lock on; only a live process can hold it (the
    kernel drops the locks of a process that died). The lock is released at
    once.

    Call it only before this process opens the database: POSIX locks belong
    to the process, so its own connections do not count, and closing the
    file here would drop the locks SQLite holds on it for this process.
    """
    shm = os.fspath(path) + "-shm"
    try:
        fd = os.open(shm, os.O_RDWR)
    except FileNotFoundError:
        return False
    except PermissionError:
        return True  # a daemon running as another user: assume it is there
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _SHM_DMS_OFFSET, os.SEEK_SET)
        except OSError:
            return True
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, _SHM_DMS_OFFSET, os.SEEK_SET)
        return False
    finally:
        os.close(fd)


class StorageQueueClient(QueueClient):
    """A :class:`QueueClient` working directly on a :class:`~slimta.queue.storage.QueueStorage`.

    Used as it is for shared storages (PostgreSQL, Redis), which running
    daemons watch: a change made here (retry, release) wakes them through the
    storage's notifications, and one made to a message being delivered just
    loses to the delivery's result.
    """

    def __init__(self, storage: Any, batch: int = BATCH) -> None:
        self.batch = batch
        self._storage: Any = storage
        self._busy = False

    async def open(self) -> None:
        try:
            await self._storage.open()
        except Exception as exc:
            raise QueueUnavailableError(f"cannot open the queue storage: {exc}") from exc

    async def close(self) -> None:
        if self._storage is not None:
            await self._storage.close()

    def _writable(self) -> None:
        """Raise :class:`QueueBusyError` when changes must not be made now."""

    async def _each(self, ids: Sequence[str], op: Callable[[str], Awaitable[bool]],
                    progress: Progress | None) -> BatchResult:
        """``op(id)`` for every id, a batch at a time (one transaction per batch)."""
        self._writable()
        result = BatchResult()
        total = len(ids)
        for start in range(0, total, self.batch):
            chunk = ids[start:start + self.batch]
            found = await asyncio.gather(*(self._found(op, id) for id in chunk))
            for id, ok in zip(chunk, found, strict=True):
                (result.done if ok else result.missing).append(id)
            if progress is not None:
                progress(min(start + self.batch, total), total)
        return result

    @staticmethod
    async def _found(op: Callable[[str], Awaitable[bool]], id: str) -> bool:
        try:
            return await op(id)
        except KeyError:
            return False

    async def list(self) -> list[QueueEntry]:
        return await self._storage.list()

    async def show(self, id: str) -> MessageDetail:
        from slimta.queue.record import envelope_to_record

        stored = await self._storage.get(id)
        meta, data = envelope_to_record(stored.envelope)
        return MessageDetail(
            id=id, envelope=meta, data=data, delivered=sorted(stored.delivered),
            attempts=stored.attempts, next_attempt=stored.timestamp,
            last_reply=stored.last_reply, held=stored.held, history=list(stored.history),
        )

    async def _due_now(self, id: str) -> bool:
        await self._storage.set_timestamp(id, time.time())
        return True

    async def retry(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, self._due_now, progress)

    async def hold(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        async def op(id: str) -> bool:
            await self._storage.set_held(id, True)
            return True

        return await self._each(ids, op, progress)

    async def release(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        async def op(id: str) -> bool:
            await self._storage.set_held(id, False)
            return await self._due_now(id)

        return await self._each(ids, op, progress)

    async def delete(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, self._storage.remove, progress)

    async def flush(self, progress: Progress | None = None) -> BatchResult:
        self._writable()
        ids = [id for _, id in await self._storage.load()]
        return await self._each(ids, self._due_now, progress)

    async def stats(self) -> dict[str, int]:
        return dict(await self._storage.stats())


class SqliteQueueClient(StorageQueueClient):
    """A :class:`QueueClient` on the SQLite queue file ``path`` of a stopped daemon.

    The file must exist. Changes are refused with :class:`QueueBusyError`
    while another process has the file open; reads are allowed.
    """

    def __init__(self, path: str | os.PathLike[str], batch: int = BATCH) -> None:
        super().__init__(None, batch)
        self.path = os.fspath(path)

    async def open(self) -> None:
        from slimta.queue.sqlite import SqliteStorage, StorageVersionError

        if not os.path.isfile(self.path):
            raise QueueUnavailableError(f"no queue file at {self.path!r}")
        # before our own connections exist (see queue_file_in_use)
        self._busy = queue_file_in_use(self.path)
        storage = SqliteStorage(self.path, busy_timeout=5.0, readers=1)
        try:
            await storage.open()
        except (StorageVersionError, sqlite3.Error) as exc:
            raise QueueUnavailableError(f"cannot open the queue {self.path!r}: {exc}") from exc
        self._storage = storage

    async def close(self) -> None:
        if self._storage is not None:
            await self._storage.close()
            self._storage = None

    def _writable(self) -> None:
        if self._busy:
            raise QueueBusyError(
                f"the queue {self.path!r} is open in another process (a running daemon?): "
                "stop it before changing its queue file"
            )


class AdminQueueClient(QueueClient):
    """A :class:`QueueClient` on the queue ``queue_name`` of a running daemon.

    ``url`` is the daemon's admin endpoint (``http://127.0.0.1:8025``);
    ``token`` its bearer token, if it has one. Without ``queue_name`` the
    daemon must have exactly one queue (else :class:`QueueUnavailableError`
    lists them). One HTTP session (keep-alive) for everything, one request
    per id; the daemon applies each change to its schedule at once.
    """

    def __init__(self, url: str, queue_name: str | None = None, token: str | None = None,
                 batch: int = BATCH, timeout: float = 30.0, connections: int = 8) -> None:
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.queue_name = queue_name
        self.token = token
        self.batch = batch
        self.timeout = timeout
        self.connections = connections
        self._session: Any = None

    async def open(self) -> None:
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=self.connections))
        try:
            names = list((await self._json("GET", "/queues"))["queues"])
        except BaseException:
            await self.close()
            raise
        if self.queue_name is None:
            if len(names) != 1:
                await self.close()
                raise QueueUnavailableError(
                    f"the daemon at {self.url} has {len(names)} queues, choose one with "
                    f"--queue NAME: {', '.join(names) or '(none)'}")
            self.queue_name = names[0]
        elif self.queue_name not in names:
            await self.close()
            raise QueueUnavailableError(
                f"the daemon at {self.url} has no queue named {self.queue_name!r} "
                f"(it has: {', '.join(names) or 'none'})")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _path(self, *parts: str) -> str:
        from urllib.parse import quote

        return "/queues/" + "/".join(quote(p, safe="") for p in (self.queue_name or "", *parts))

    async def _request(self, method: str, path: str) -> tuple[int, bytes]:
        """(status, body); connection failures and 401 raise QueueUnavailableError."""
        import aiohttp

        try:
            async with self._session.request(method, self.url + path) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise QueueUnavailableError(
                f"cannot reach the admin endpoint at {self.url}: {exc or type(exc).__name__}"
            ) from exc
        if status == 401:
            hint = "the token was refused" if self.token else "it requires a token"
            raise QueueUnavailableError(
                f"the admin endpoint at {self.url} answered 401 Unauthorized: {hint} "
                "(give it with --token-env VAR, the name of a variable holding it)")
        return status, body

    async def _json(self, method: str, path: str, missing_ok: bool = False) -> Any:
        """The JSON answer; None for a 404 when ``missing_ok``."""
        status, body = await self._request(method, path)
        if status == 404 and missing_ok:
            return None
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if status != 200 or data is None:
            text = data.get("error") if isinstance(data, dict) else body[:200].decode(
                "utf-8", "replace")
            raise QueueUnavailableError(
                f"the admin endpoint at {self.url} answered {status} to {method} {path}: {text}")
        return data

    async def list(self) -> list[QueueEntry]:
        data = await self._json("GET", self._path())
        fields = QueueEntry.__dataclass_fields__
        return [QueueEntry(**{k: v for k, v in e.items() if k in fields})
                for e in data["entries"]]

    async def show(self, id: str) -> MessageDetail:
        info = await self._json("GET", self._path(id), missing_ok=True)
        if info is None:
            raise KeyError(id)
        status, data = await self._request("GET", self._path(id, "message"))
        if status == 404:
            raise KeyError(id)
        if status != 200:
            raise QueueUnavailableError(
                f"the admin endpoint at {self.url} answered {status} for message {id}")
        return MessageDetail(
            id=id, envelope=info["envelope"], data=data,
            delivered=list(info.get("delivered_indexes") or []), attempts=info["attempts"],
            next_attempt=info["next_attempt"], last_reply=info["last_reply"],
            held=info["held"],
            # a daemon of an older slimta sends no history
            history=[(float(t), reply) for t, reply in info.get("history") or []])

    async def _each(self, ids: Sequence[str], method: str, action: str | None,
                    progress: Progress | None) -> BatchResult:
        """One request per id (``action``: POST .../id/action, else DELETE .../id)."""

        async def one(id: str) -> bool:
            path = self._path(id, action) if action else self._path(id)
            return await self._json(method, path, missing_ok=True) is not None

        result = BatchResult()
        total = len(ids)
        for start in range(0, total, self.batch):
            chunk = ids[start:start + self.batch]
            found = await asyncio.gather(*(one(id) for id in chunk))
            for id, ok in zip(chunk, found, strict=True):
                (result.done if ok else result.missing).append(id)
            if progress is not None:
                progress(min(start + self.batch, total), total)
        return result

    async def retry(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, "POST", "retry", progress)

    async def hold(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, "POST", "hold", progress)

    async def release(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, "POST", "release", progress)

    async def delete(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._each(ids, "DELETE", None, progress)

    async def flush(self, progress: Progress | None = None) -> BatchResult:
        ids = [e.id for e in await self.list() if not e.held]
        await self._json("POST", self._path("flush"))
        if progress is not None:
            progress(len(ids), len(ids))
        return BatchResult(done=ids)

    async def stats(self) -> dict[str, int]:
        data = await self._json("GET", self._path("stats"))
        data.pop("queue", None)
        return data


def worker_queue_files(path: str | os.PathLike[str]) -> list[str]:
    """The per-worker files of the SQLite queue ``path`` that exist, by worker number.

    ``slimta serve --workers N`` gives worker *i* the file ``<stem>.<i><suffix>``
    (``queue.db``: ``queue.1.db``, ``queue.2.db``, ...; see :mod:`slimta.app.workers`).
    """
    base = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(base)
    stem, suffix = os.path.splitext(name)
    pattern = re.compile(re.escape(stem) + r"\.(\d+)" + re.escape(suffix) + "$")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [(int(m.group(1)), n) for n in names if (m := pattern.match(n))]
    return [os.path.join(folder, n) for _, n in sorted(found)]


class MultiQueueClient(QueueClient):
    """One :class:`QueueClient` over several queues that are one in the operator's eyes.

    These are the per-worker SQLite files of ``slimta serve --workers N`` (or
    the workers' admin endpoints). ``list`` merges them (by next attempt),
    each id is handled by the queue that holds it (one that none holds is
    missing), ``flush`` and ``stats`` cover them all (counts summed).
    """

    def __init__(self, clients: Sequence[QueueClient]) -> None:
        self.clients = list(clients)

    async def open(self) -> None:
        opened: list[QueueClient] = []
        try:
            for client in self.clients:
                await client.open()
                opened.append(client)
        except BaseException:
            for client in opened:
                await client.close()
            raise

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def list(self) -> list[QueueEntry]:
        entries = [e for client in self.clients for e in await client.list()]
        return sorted(entries, key=lambda e: e.next_attempt)

    async def show(self, id: str) -> MessageDetail:
        for client in self.clients:
            try:
                return await client.show(id)
            except KeyError:
                continue
        raise KeyError(id)

    async def _split(self, ids: Sequence[str], method: str,
                     progress: Progress | None) -> BatchResult:
        result = BatchResult()
        left = list(dict.fromkeys(ids))
        total, done = len(left), 0
        for client in self.clients:
            if not left:
                break
            held = {e.id for e in await client.list()}
            mine = [i for i in left if i in held]
            left = [i for i in left if i not in held]
            if not mine:
                continue
            offset = done

            def step(n: int, _total: int, offset: int = offset) -> None:
                if progress is not None:
                    progress(offset + n, total)

            part = await getattr(client, method)(mine, step)
            result.done += part.done
            result.missing += part.missing
            done += len(mine)
        result.missing += left
        return result

    async def retry(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._split(ids, "retry", progress)

    async def hold(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._split(ids, "hold", progress)

    async def release(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._split(ids, "release", progress)

    async def delete(self, ids: Sequence[str], progress: Progress | None = None) -> BatchResult:
        return await self._split(ids, "delete", progress)

    async def flush(self, progress: Progress | None = None) -> BatchResult:
        result = BatchResult()
        for client in self.clients:
            part = await client.flush(progress)
            result.done += part.done
            result.missing += part.missing
        return result

    async def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for client in self.clients:
            for key, value in (await client.stats()).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total


# --- the commands ------------------------------------------------------------

_FULL_ID = re.compile(r"[0-9a-f]{32}")


class _Unavailable(click.ClickException):
    exit_code = EXIT_USAGE


def _err(text: str) -> None:
    click.echo(f"slimta queue: {text}", err=True)


def _run(ctx: click.Context, job: Callable[[QueueClient], Awaitable[int]]) -> None:
    """Open the client, run ``job`` with it, exit with the code it returns."""
    factory: Callable[[], QueueClient] = ctx.obj

    async def main() -> int:
        async with factory() as client:
            return await job(client)

    try:
        code = asyncio.run(main())
    except QueueUnavailableError as exc:
        raise _Unavailable(str(exc)) from exc
    ctx.exit(code)


async def _resolve(client: QueueClient, ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Full ids for ``ids``: an id may be shortened to a unique prefix. (found, missing)."""
    ids = list(dict.fromkeys(i.strip().lower() for i in ids))
    if all(_FULL_ID.fullmatch(i) for i in ids):
        return ids, []
    known = [e.id for e in await client.list()]
    found, missing = [], []
    for i in ids:
        if _FULL_ID.fullmatch(i):
            found.append(i)
            continue
        matches = [k for k in known if k.startswith(i)] if i else []
        if len(matches) == 1:
            found.append(matches[0])
        else:
            if len(matches) > 1:
                _err(f"{i!r} is ambiguous ({len(matches)} messages)")
            missing.append(i)
    return found, missing


def _reporter(verb: str) -> Progress:
    """Progress on stderr for long operations (more than one batch)."""
    tty = sys.stderr.isatty()

    def report(done: int, total: int) -> None:
        if total <= BATCH:
            return
        end = "\n" if (done >= total or not tty) else "\r"
        click.echo(f"slimta queue: {verb} {done}/{total}", err=True, nl=False)
        click.echo(end, err=True, nl=False)

    return report


def _finish(verb: str, result: BatchResult, missing: list[str], as_json: bool) -> int:
    result.missing = missing + result.missing
    for id in result.missing:
        _err(f"no message {id}")
    if as_json:
        click.echo(json.dumps(result.to_json()))
    n = len(result.done)
    _err(f"{verb} {n} message{'' if n == 1 else 's'}")
    return EXIT_MISSING if result.missing else EXIT_OK


def _batch_command(name: str, verb: str, method: str, help: str) -> click.Command:
    @click.command(name, help=help)
    @click.argument("ids", nargs=-1, required=True, metavar="ID...")
    @click.option("--json", "as_json", is_flag=True, help="Print {done, missing} as JSON.")
    @click.pass_context
    def command(ctx: click.Context, ids: tuple[str, ...], as_json: bool) -> None:
        async def job(client: QueueClient) -> int:
            found, missing = await _resolve(client, ids)
            result = await getattr(client, method)(found, _reporter(verb))
            return _finish(verb, result, missing, as_json)

        _run(ctx, job)

    return command


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1024 * 1024):.1f} MiB"


def _print_list(entries: list[QueueEntry]) -> None:
    if not entries:
        click.echo("Mail queue is empty")
        return
    now = time.time()
    click.echo(f"{'ID':<33} {'SIZE':>8}  {'ARRIVAL':<19}  SENDER/RECIPIENTS")
    for e in entries:
        mark = "!" if e.held else " "
        click.echo(f"{e.id}{mark} {e.size:>8}  {_when(e.created):<19}  <{e.sender}>")
        if e.held:
            state = "held"
        elif e.next_attempt <= now:
            state = "due now"
        else:
            state = f"next attempt {_when(e.next_attempt)}"
        line = f"attempts {e.attempts}, {state}"
        if e.last_reply:
            line += f", last reply: {e.last_reply}"
        click.echo(f"{'':>4}{line}")
        for rcpt in e.recipients:
            click.echo(f"{'':>8}<{rcpt}>")
    held = sum(1 for e in entries if e.held)
    rcpts = sum(len(e.recipients) for e in entries)
    size = sum(e.size for e in entries)
    n = len(entries)
    click.echo(f"-- {n} message{'' if n == 1 else 's'} ({held} held), {rcpts} recipient"
               f"{'' if rcpts == 1 else 's'}, {_size(size)}")


def _print_detail(d: MessageDetail) -> None:
    meta = d.envelope
    done = set(d.delivered)
    client = meta.get("client") or {}
    lines = [
        ("id", d.id),
        ("state", "held" if d.held else "queued"),
        ("size", str(len(d.data))),
        ("arrival", _when(meta.get("timestamp"))),
        ("attempts", str(d.attempts)),
        ("next attempt", "never (held)" if d.held else _when(d.next_attempt)),
        ("last reply", d.last_reply or "-"),
    ]
    lines += [("attempt", f"{_when(t)}: {reply or '-'}") for t, reply in d.history]
    lines += [
        ("sender", f"<{meta.get('sender') or ''}>"),
    ]
    for i, rcpt in enumerate(d.recipients):
        lines.append(("recipient", f"<{rcpt}>" + (" (delivered)" if i in done else "")))
    info = ", ".join(f"{k}={v}" for k, v in client.items() if v is not None)
    lines.append(("client", info or "-"))
    lines.append(("received by", meta.get("receiver") or "-"))
    for key in ("ret", "envid", "auth"):
        if meta.get(key) is not None:
            lines.append((key, str(meta[key])))
    lines.append(("body", f"{meta.get('body') or '7BIT'}"
                          f"{', SMTPUTF8' if meta.get('smtputf8') else ''}"))
    for key, value in lines:
        click.echo(f"{key + ':':<14}{value}")
    click.echo()
    out = click.get_binary_stream("stdout")
    out.write(d.data if d.data.endswith(b"\n") or not d.data else d.data + b"\n")
    out.flush()


_QUEUE_HELP = """Look at and manage a queue, like Postfix's postqueue and postsuper.

\b
--admin URL works on a RUNNING daemon through its admin endpoint
(--queue NAME picks one of its queues; --token-env VAR names the
variable holding its bearer token). --db PATH works on the SQLite queue
file of a STOPPED daemon: reading (list, show, stats) is safe at any
time; changes are refused while another process (a running daemon) has
the file open. --config PATH works on the storage of a queue of that
config file (--queue NAME picks one): a postgres or redis queue shared
by running daemons, which see the changes at once, or a sqlite queue
file as with --db. Give one of --db, --admin and --config.

\b
With `slimta serve --workers N`, --db PATH covers the per-worker files
(PATH queue.db: queue.1.db, queue.2.db, ...), and --admin takes the
workers' endpoints separated by commas (worker i: the admin port + i - 1).

Ids may be shortened to a unique prefix.

\b
Exit codes:
  0  done
  1  some id was not found (the others were still processed)
  2  usage error, or the queue cannot be used (missing file, not a
     slimta queue, in use by a running daemon, daemon unreachable,
     token refused, no such queue)
"""


def _config_client(path: str, queue_name: str | None) -> Callable[[], QueueClient]:
    """The client for the storage of the queue ``queue_name`` in the config file ``path``."""
    from slimta.app import build as B
    from slimta.app import config as C
    from slimta.app.config import ConfigError, load_config

    try:
        config = load_config(path)
    except (ConfigError, OSError) as exc:
        raise _Unavailable(f"--config {path}: {exc}") from exc
    names = list(config.queue)
    if queue_name is None:
        if len(names) != 1:
            raise click.UsageError(f"--config {path} has the queues {', '.join(names)}: "
                                   "pick one with --queue NAME")
        queue_name = names[0]
    spec = config.queue.get(queue_name)
    if spec is None:
        raise _Unavailable(f"--config {path}: no queue named {queue_name!r} "
                           f"(there are: {', '.join(names) or 'none'})")
    if isinstance(spec, C.SqliteQueueConfig):
        file = os.path.join(B.data_dir_of(config), os.path.expanduser(spec.path or
                                                                      f"{queue_name}.db"))
        return lambda: SqliteQueueClient(file)
    if isinstance(spec, C.PostgresQueueConfig | C.RedisQueueConfig):
        return lambda: StorageQueueClient(B.shared_storage(spec))
    raise _Unavailable(f"--config {path}: queue {queue_name!r} is of type {spec.type!r}, "
                       "which keeps nothing another process can reach: use --admin")


def _client_factory(ctx: click.Context, db: str | None, admin: str | None,
                    queue_name: str | None, token_env: str | None,
                    config: str | None = None) -> Callable[[], QueueClient]:
    """The client the options ask for; a UsageError (exit 2) for a bad combination."""
    src = click.core.ParameterSource
    if config is not None:
        given = [name for name, value in (("db", db), ("admin", admin))
                 if value is not None and ctx.get_parameter_source(name) == src.COMMANDLINE]
        if given:
            raise click.UsageError("--config goes without --db and --admin")
        if token_env is not None:
            raise click.UsageError("--token-env goes with --admin, not --config")
        return _config_client(config, queue_name)
    if db is not None and admin is not None:
        # an option on the command line wins over the other one's environment variable
        db_cli = ctx.get_parameter_source("db") == src.COMMANDLINE
        admin_cli = ctx.get_parameter_source("admin") == src.COMMANDLINE
        if db_cli == admin_cli:
            raise click.UsageError("--db and --admin are mutually exclusive")
        if db_cli:
            admin = None
        else:
            db = None
    if db is not None:
        for name, value in (("--queue", queue_name), ("--token-env", token_env)):
            if value is not None:
                raise click.UsageError(f"{name} goes with --admin, not --db")
        path = db
        workers = worker_queue_files(path)
        if workers:  # slimta serve --workers N: one file per worker, and the plain one if any
            paths = ([path] if os.path.isfile(path) else []) + workers
            return lambda: MultiQueueClient([SqliteQueueClient(p) for p in paths])
        return lambda: SqliteQueueClient(path)
    if admin is None:
        raise click.UsageError("give --db PATH (a stopped daemon's queue file) or --admin URL "
                               "(a running daemon's admin endpoint)")
    token = None
    if token_env is not None:
        token = os.environ.get(token_env)
        if not token:
            raise click.UsageError(f"--token-env {token_env}: the variable is not set")
    else:
        token = os.environ.get("SLIMTA_ADMIN_TOKEN") or None
    urls = [u.strip() for u in admin.split(",") if u.strip()]
    if len(urls) > 1:  # the endpoints of the workers of slimta serve --workers N
        return lambda: MultiQueueClient([AdminQueueClient(u, queue_name, token) for u in urls])
    url = admin
    return lambda: AdminQueueClient(url, queue_name, token)


@click.group("queue", help=_QUEUE_HELP)
@click.option("--db", "db", default=None, envvar="SLIMTA_QUEUE_DB", metavar="PATH",
              type=click.Path(dir_okay=False),
              help="The SQLite queue file of a stopped daemon (or $SLIMTA_QUEUE_DB).")
@click.option("--admin", "admin", default=None, envvar="SLIMTA_ADMIN_URL", metavar="URL",
              help="The admin endpoint of a running daemon, e.g. http://127.0.0.1:8025 "
                   "(or $SLIMTA_ADMIN_URL).")
@click.option("--config", "-c", "config", default=None, metavar="PATH",
              type=click.Path(dir_okay=False),
              help="A config file: work on the storage of one of its queues (postgres, "
                   "redis or sqlite).")
@click.option("--queue", "queue_name", default=None, metavar="NAME",
              help="With --admin or --config: which queue (default: the only one).")
@click.option("--token-env", "token_env", default=None, metavar="VAR",
              help="With --admin: the environment variable holding the bearer token "
                   "(default: $SLIMTA_ADMIN_TOKEN if set).")
@click.pass_context
def queue(ctx: click.Context, db: str | None, admin: str | None, config: str | None,
          queue_name: str | None, token_env: str | None) -> None:
    ctx.obj = _client_factory(ctx, db, admin, queue_name, token_env, config)


@queue.command("list", short_help="Every message, like postqueue -p.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """Every message: id ('!' after it: held), size, arrival, sender, attempts,
    next attempt, last reply and the recipients not yet delivered."""

    async def job(client: QueueClient) -> int:
        entries = await client.list()
        if as_json:
            click.echo(json.dumps([entry_to_json(e) for e in entries]))
        else:
            _print_list(entries)
        return EXIT_OK

    _run(ctx, job)


@queue.command()
@click.argument("id")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def show(ctx: click.Context, id: str, as_json: bool) -> None:
    """The envelope and state of message ID, then the message itself."""

    async def job(client: QueueClient) -> int:
        found, missing = await _resolve(client, [id])
        try:
            if missing:
                raise KeyError(id)
            detail = await client.show(found[0])
        except KeyError:
            _err(f"no message {id}")
            return EXIT_MISSING
        if as_json:
            click.echo(json.dumps(detail.to_json()))
        else:
            _print_detail(detail)
        return EXIT_OK

    _run(ctx, job)


@queue.command()
@click.argument("ids", nargs=-1, metavar="ID...")
@click.option("--all", "all_", is_flag=True, help="Every message that is not held.")
@click.option("--json", "as_json", is_flag=True, help="Print {done, missing} as JSON.")
@click.pass_context
def retry(ctx: click.Context, ids: tuple[str, ...], all_: bool, as_json: bool) -> None:
    """Make messages due now (attempted when the daemon runs)."""
    if all_ == bool(ids):
        raise click.UsageError("give message ids or --all (not both)")

    async def job(client: QueueClient) -> int:
        if all_:
            return _finish("retried", await client.flush(_reporter("retried")), [], as_json)
        found, missing = await _resolve(client, ids)
        return _finish("retried", await client.retry(found, _reporter("retried")), missing,
                       as_json)

    _run(ctx, job)


queue.add_command(_batch_command(
    "hold", "held", "hold", "Keep messages in the queue without attempting them."))
queue.add_command(_batch_command(
    "release", "released", "release", "Release held messages; they are due now."))
queue.add_command(_batch_command(
    "delete", "deleted", "delete", "Remove messages without delivering or bouncing them."))


@queue.command(short_help="Make every message not held due now.")
@click.option("--json", "as_json", is_flag=True, help="Print {done, missing} as JSON.")
@click.pass_context
def flush(ctx: click.Context, as_json: bool) -> None:
    """Make every message that is not held due now (the same as retry --all)."""

    async def job(client: QueueClient) -> int:
        return _finish("flushed", await client.flush(_reporter("flushed")), [], as_json)

    _run(ctx, job)


@queue.command(short_help="Counts of messages, held, recipients, bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Counts: messages, held messages, recipients not yet delivered, bytes."""

    async def job(client: QueueClient) -> int:
        counts = await client.stats()
        if as_json:
            click.echo(json.dumps(counts))
        else:
            for key, value in counts.items():
                click.echo(f"{key + ':':<12}{value}")
        return EXIT_OK

    _run(ctx, job)
