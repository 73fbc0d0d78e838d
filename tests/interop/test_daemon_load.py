"""The real `slimta serve` under load: SIGTERM loses no acknowledged message; SIGHUP fails none.

A pool of smtplib clients records the id of every message the daemon
acknowledged with 250; after the signal (and for SIGTERM, a restart on the
same SQLite queue) each of them must be in the Maildir exactly once.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_crash import delivered_ids, load_client

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

CONFIG = """
process:
  slimta: {{data_dir: data}}
edge:
  in:
    type: smtp
    queue: q
    listener: '127.0.0.1:{port}'
    rules: {{banner: '{banner}'}}
queue:
  q: {{type: sqlite, relay: md}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path: Path, config: Path, port: int) -> subprocess.Popen:
    err = open(tmp_path / "stderr.log", "ab")  # noqa: SIM115 - inherited by the process
    proc = subprocess.Popen([*CLI, "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=err, env=ENV, cwd=tmp_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
            time.sleep(0.05)
    raise AssertionError("the daemon did not start")


def run_load(port: int, until, workers: int = 10):
    acked: list[str] = []
    failed: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=load_client, args=(port, w, acked, stop, failed, 20),
                                daemon=True) for w in range(workers)]
    for t in threads:
        t.start()
    try:
        until(acked)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    return acked, failed


def wait_for(tmp_path: Path, ids: list[str], timeout: float = 60) -> collections.Counter:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = delivered_ids(tmp_path / "data/mail")
        if all(got[i] for i in ids):
            return got
        time.sleep(0.2)
    return delivered_ids(tmp_path / "data/mail")


def test_sigterm_during_load_loses_no_acknowledged_message(tmp_path):
    port = free_port()
    config = tmp_path / "slimta.yaml"
    config.write_text(CONFIG.format(port=port, banner="one"))
    proc = start(tmp_path, config, port)
    try:
        def until(acked):
            deadline = time.monotonic() + 30
            while len(acked) < 400 and time.monotonic() < deadline:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, (tmp_path / "stderr.log").read_text()

        acked, _failed = run_load(port, until)
    finally:
        proc.kill()
    assert len(acked) >= 400
    proc = start(tmp_path, config, port)  # delivers what the first run left queued
    try:
        got = wait_for(tmp_path, acked)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    missing = [i for i in acked if not got[i]]
    assert missing == [], f"{len(missing)} of {len(acked)} acknowledged messages lost"
    assert max(got.values()) == 1, "a message was delivered twice"


def test_sighup_during_load_fails_no_session(tmp_path):
    port = free_port()
    config = tmp_path / "slimta.yaml"
    config.write_text(CONFIG.format(port=port, banner="one"))
    proc = start(tmp_path, config, port)
    try:
        def until(acked):
            for banner in ("two", "three", "four"):
                target = len(acked) + 150
                deadline = time.monotonic() + 30
                while len(acked) < target and time.monotonic() < deadline:
                    time.sleep(0.01)
                config.write_text(CONFIG.format(port=port, banner=banner))
                proc.send_signal(signal.SIGHUP)
            target = len(acked) + 150
            deadline = time.monotonic() + 30
            while len(acked) < target and time.monotonic() < deadline:
                time.sleep(0.01)

        acked, failed = run_load(port, until)
        assert failed == []
        assert len(acked) >= 600
        got = wait_for(tmp_path, acked)
        missing = [i for i in acked if not got[i]]
        assert missing == [], f"{len(missing)} of {len(acked)} acknowledged messages lost"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            assert "four" in s.makefile("rb").readline().decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        proc.kill()
    assert "reload failed" not in (tmp_path / "stderr.log").read_text()
