"""Helpers for tests that start private daemons (Dovecot, Postfix, haproxy,
dnsmasq, smtp-sink, spamd): free ports, stopping them, waiting for them to go.

The daemons' workers run as an unprivileged user, so their files live in a
fresh 0755 directory (:func:`daemon_dir`) rather than in pytest's private
(0700) tmp_path, and whatever they write belongs to :func:`daemon_user`.
:func:`dovecot_setup` writes a Dovecot with a passwd-file of users and
Maildirs there, and :func:`start_dovecot` starts it.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_port(hosts: tuple[str, ...]) -> int:
    """A TCP port that is free on every one of ``hosts`` (at the time of asking)."""
    for _ in range(200):
        with socket.socket() as first:
            first.bind((hosts[0], 0))
            port = first.getsockname()[1]
            with contextlib.ExitStack() as stack:
                try:
                    for host in hosts[1:]:
                        stack.enter_context(socket.socket()).bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on every test address")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a daemon we started in the foreground: SIGTERM, then SIGKILL after
    ``timeout`` seconds (idempotent)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Wait up to ``timeout`` seconds for :func:`gone`; whether it is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(interval)
    return gone(pid)


def read_log(path: str) -> str:
    """The text of a daemon's log file, ``''`` before it exists."""
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def daemon_dir(prefix: str) -> str:
    """A fresh temporary directory that every user may enter (0755)."""
    base = tempfile.mkdtemp(prefix=prefix)
    os.chmod(base, 0o755)
    return base


def daemon_user() -> tuple[str, str, int, int]:
    """``(user, group, uid, gid)`` for a daemon's workers: nobody when we are root."""
    if os.geteuid() == 0:
        return "nobody", "nogroup", 65534, 65534
    return getpass.getuser(), str(os.getgid()), os.getuid(), os.getgid()


def dovecot_setup(base: str, users: Iterable[str], *, protocols: str = "",
                  settings: str = "") -> tuple[str, str]:
    """Write ``base``/dovecot.conf: a Dovecot whose ``users`` (``<name>@example.test``,
    password ``x``) have Maildirs under ``base``/mail; returns ``(conf, mail)``.

    It runs ``protocols``, logs to ``base``/dovecot.log and runs as
    :func:`daemon_user` (Dovecot refuses uid 0 in the users file);
    ``settings`` is appended to the configuration.
    """
    user, group, uid, gid = daemon_user()
    mail = os.path.join(base, "mail")
    os.mkdir(mail)
    os.chown(mail, uid, gid)
    users_file = os.path.join(base, "users")
    with open(users_file, "w") as f:
        for name in users:
            f.write(f"{name}@example.test:{{PLAIN}}x:{uid}:{gid}::{mail}/{name}::\n")
    os.chmod(users_file, 0o644)
    conf = os.path.join(base, "dovecot.conf")
    with open(conf, "w") as f:
        f.write(textwrap.dedent(f"""\
            base_dir = {base}/run
            state_dir = {base}/state
            log_path = {base}/dovecot.log
            protocols = {protocols}
            ssl = no
            default_internal_user = {user}
            default_internal_group = {group}
            default_login_user = {user}
            mail_location = maildir:{mail}/%n
            first_valid_uid = 0
            passdb {{
              driver = passwd-file
              args = {users_file}
            }}
            userdb {{
              driver = passwd-file
              args = {users_file}
            }}
        """) + textwrap.dedent(settings))
    os.chmod(conf, 0o644)
    return conf, mail


def start_dovecot(binary: str, conf: str) -> None:
    """Run ``dovecot -c conf``, which forks the daemon and returns; its output goes to
    start.log beside ``conf``."""
    with open(os.path.join(os.path.dirname(conf), "start.log"), "wb") as out:
        # the daemon keeps its stdout and stderr: give it a file, not a pipe
        subprocess.run([binary, "-c", conf], check=True, stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out, timeout=30)
