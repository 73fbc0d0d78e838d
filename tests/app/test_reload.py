"""`slimta serve` reloads its config on SIGHUP: under smtp-source load, with a broken config."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_serve import CLI, ENV, connect, free_port

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
  q: {{type: sqlite, relay: md{retry}}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
"""


def write(path: Path, port: int, banner: str, retry: str = "") -> None:
    path.write_text(CONFIG.format(port=port, banner=banner, retry=retry))


def start(tmp_path: Path, config: Path) -> subprocess.Popen:
    err = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([*CLI, "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=err, env=ENV, cwd=tmp_path)


def delivered(tmp_path: Path) -> int:
    new = tmp_path / "data/mail/new"
    return len(os.listdir(new)) if new.is_dir() else 0


def wait_delivered(tmp_path: Path, count: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while delivered(tmp_path) < count and time.monotonic() < deadline:
        time.sleep(0.1)
    return delivered(tmp_path)


def _greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline().decode()


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    finally:
        proc.kill()


@pytest.mark.parametrize("change", ["banner", "queue"])
def test_sighup_under_smtp_source_load(tmp_path, change):
    """smtp-source -s 10 -m 2000 -d: no failed session, every message in the Maildir."""
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(source):
        pytest.fail("required program 'smtp-source' is not installed")
    port = free_port()
    config = tmp_path / "slimta.yaml"
    write(config, port, "old banner")
    proc = start(tmp_path, config)
    try:
        connect(port, proc).quit()
        load = subprocess.Popen(
            [source, "-s", "10", "-m", "2000", "-d", "-f", "a@example.com",
             "-t", "b@example.com", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(0.5)
        retry = ", retry: {maximum: 5, delay: '60'}" if change == "queue" else ""
        write(config, port, "new banner", retry)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert load.poll() is None, "the load ended before the reload: make it longer"
        out, err = load.communicate(timeout=120)
        assert load.returncode == 0, (out, err)
        assert err == b"", err
        assert "new banner" in _greeting(port)
        assert wait_delivered(tmp_path, 2000) == 2000
        assert proc.poll() is None
    finally:
        stop(proc)
    log = (tmp_path / "stderr.log").read_text()
    assert "reload failed" not in log


def test_sighup_with_broken_config_keeps_running(tmp_path):
    port = free_port()
    config = tmp_path / "slimta.yaml"
    write(config, port, "old banner")
    proc = start(tmp_path, config)
    try:
        connect(port, proc).quit()
        config.write_text(config.read_text().replace("queue: q", "queue: nope"))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        log = tmp_path / "stderr.log"
        while "reload failed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = log.read_text()
        assert "reload failed, still running the old config" in text
        assert "edge.in.queue" in text
        assert proc.poll() is None
        assert "old banner" in _greeting(port)
        with connect(port, proc) as client:
            assert client.sendmail("a@example.com", ["b@example.com"],
                                   b"Subject: still\r\n\r\nhere\r\n") == {}
        assert wait_delivered(tmp_path, 1, 30) == 1
        # a fixed config is taken at the next SIGHUP
        write(config, port, "fixed banner")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "fixed banner" not in _greeting(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "fixed banner" in _greeting(port)
    finally:
        stop(proc)


def test_sighup_keeps_queued_mail_when_the_queue_changes(tmp_path):
    """Mail stored with no relay reachable stays queued across a reload that changes the queue."""
    port = free_port()
    config = tmp_path / "slimta.yaml"
    write(config, port, "one")
    proc = start(tmp_path, config)
    try:
        with connect(port, proc) as client:
            for i in range(20):
                assert client.sendmail("a@example.com", ["b@example.com"],
                                       f"Subject: {i}\r\n\r\nx\r\n".encode()) == {}
        write(config, port, "two", ", retry: {maximum: 3, delay: '1'}")
        proc.send_signal(signal.SIGHUP)
        assert wait_delivered(tmp_path, 20, 30) == 20
        with connect(port, proc) as client:
            assert client.sendmail("a@example.com", ["b@example.com"],
                                   b"Subject: after\r\n\r\nx\r\n") == {}
        assert wait_delivered(tmp_path, 21, 30) == 21
    finally:
        stop(proc)
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()



def test_sighup_moves_a_listener(tmp_path):
    """A listener added by the reload is bound; one the new config drops is closed."""
    port, other = free_port(), free_port()
    config = tmp_path / "slimta.yaml"
    write(config, port, "one")
    proc = start(tmp_path, config)
    try:
        connect(port, proc).quit()
        config.write_text(config.read_text().replace(f"'127.0.0.1:{port}'",
                                                     f"['127.0.0.1:{other}']"))
        proc.send_signal(signal.SIGHUP)
        with connect(other, proc) as client:
            assert client.noop()[0] == 250
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except ConnectionRefusedError:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the dropped listener still accepts")
    finally:
        stop(proc)
