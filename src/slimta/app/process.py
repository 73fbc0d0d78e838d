"""What ``slimta serve`` does as a Unix process, from the ``process.slimta`` settings.

- :class:`Process`: the pid file (refused when it names a live process,
  written once the listeners are bound, removed at exit) and the switch to
  ``user``/``group`` after binding (only when running as root; the data
  directory is handed to that user first).
- :func:`setup_logging`: the ``logging`` dictConfig, or a default handler on
  standard error in ``log_format`` ``text`` or ``json`` (:class:`JsonFormatter`).
- :func:`stop_within`: the graceful stop, bounded by ``shutdown_timeout``.
"""

from __future__ import annotations

import asyncio
import datetime
import grp
import json
import logging
import logging.config
import os
import pwd
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["JsonFormatter", "Process", "ProcessError", "drop_privileges", "pid_alive",
           "setup_logging", "stop_within"]

log = logging.getLogger("slimta.app")

#: the format of the default text log
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class ProcessError(Exception):
    """A process setting that cannot be applied (a live pid file, an unknown user, …)."""


# --- pid file -------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (owned by anyone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None


# --- privileges -----------------------------------------------------------------

def _ids(user: str | None, group: str | None) -> tuple[int | None, int | None]:
    uid = gid = None
    if user is not None:
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise ProcessError(f"process.slimta.user: no such user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))).gr_gid
        except KeyError:
            raise ProcessError(f"process.slimta.group: no such group {group!r}") from None
    return uid, gid


def _chown_tree(path: str, uid: int, gid: int) -> None:
    """Hand ``path`` and everything under it to ``uid``/``gid`` (symlinks are not followed)."""
    os.chown(path, uid, gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)


def drop_privileges(user: str | None, group: str | None,
                    owned: Sequence[str] = ()) -> tuple[int, int] | None:
    """Switch to ``user``/``group`` when running as root; ``owned`` paths are chowned first.

    Without ``group``, the user's primary group. Returns the new ``(uid, gid)``,
    or None when nothing was changed (no user or group, or not root).
    """
    if user is None and group is None:
        return None
    uid, gid = _ids(user, group)
    if os.geteuid() != 0:
        log.warning("process.slimta.user/group: not running as root; staying uid %d",
                    os.geteuid())
        return None
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    for path in owned:
        if os.path.exists(path):
            _chown_tree(path, uid, gid)
    os.setgroups([gid])
    os.setgid(gid)
    os.setuid(uid)
    log.info("running as uid %d gid %d", uid, gid)
    return uid, gid


class Process:
    """The pid file and privilege settings of one ``slimta serve``.

    Call :meth:`check` before binding anything, :meth:`started` once the
    listeners are bound and the data directory is open, and :meth:`close`
    at exit.
    """

    def __init__(self, settings: Any, data_dir: str):
        self.settings = settings
        self.data_dir = data_dir
        self.pid_file = os.path.abspath(settings.pid_file) if settings.pid_file else None
        self._written = False

    def check(self) -> None:
        """Raise :class:`ProcessError`: the pid file names a live process, or no such user."""
        _ids(self.settings.user, self.settings.group)
        if self.pid_file is None:
            return
        pid = _read_pid(self.pid_file)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            raise ProcessError(f"{self.pid_file}: slimta is already running as process {pid}")

    def started(self) -> None:
        """Write the pid file, then drop privileges (raises ``OSError``/:class:`ProcessError`)."""
        self.check()
        if self.pid_file is not None:
            tmp = f"{self.pid_file}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, self.pid_file)
            self._written = True
        drop_privileges(self.settings.user, self.settings.group, [self.data_dir])

    def close(self) -> None:
        """Remove the pid file when it is still ours."""
        if not self._written or self.pid_file is None:
            return
        self._written = False
        if _read_pid(self.pid_file) == os.getpid():
            try:
                os.unlink(self.pid_file)
            except OSError as exc:  # a root-owned directory after dropping privileges
                log.warning("cannot remove the pid file: %s", exc)


# --- logging --------------------------------------------------------------------

#: attributes every LogRecord has; anything else was passed as ``extra``
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
#: extra fields whose value is never written
_SECRET = re.compile(r"pass|secret|token|credential|auth|key", re.I)
_BODY = re.compile(r"^(body|data|content|message_data|payload)$", re.I)


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``.

    Fields passed with ``extra=`` are added; those whose name suggests a
    secret (password, token, key, auth, …) are written as ``"********"``, and
    message data (``body``, ``data``, … or any bytes value) only as its size.
    An exception adds ``exc_info`` (the traceback text). Usable from a
    ``logging`` dictConfig as ``(): slimta.app.process.JsonFormatter``.
    """

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        out: dict[str, Any] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in _RECORD_KEYS or name.startswith("_") or name in out:
                continue
            if _SECRET.search(name):
                out[name] = "********"
            elif _BODY.match(name) or isinstance(value, (bytes, bytearray, memoryview)):
                out[name] = f"<{len(value)} bytes>" if hasattr(value, "__len__") else "<omitted>"
            else:
                out[name] = _plain(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(settings: Any) -> None:
    """Apply ``logging`` (dictConfig), else a stderr handler at ``log_level`` in ``log_format``."""
    if settings.logging:
        logging.config.dictConfig(settings.logging)
        return
    handler = logging.StreamHandler()
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, settings.log_level), handlers=[handler])


# --- shutdown -------------------------------------------------------------------

async def stop_within(app: Any, timeout: float) -> bool:
    """``app.stop()``, cancelled after ``timeout`` seconds; False if it had to be cut off.

    Cut-off deliveries stay in their (persistent) queue and are attempted
    again after the next start.
    """
    try:
        await asyncio.wait_for(app.stop(), timeout)
    except TimeoutError:
        log.warning("shutdown_timeout (%gs) reached: stopping what is still running", timeout)
        return False
    return True

