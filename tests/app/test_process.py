"""`process` settings of `slimta serve` (pid file, user/group, JSON logs, shutdown_timeout)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.app.test_serve import CLI, ENV, connect, free_port

from slimta.app.process import JsonFormatter, Process, ProcessError, pid_alive

BASE = """
process:
  slimta:
    data_dir: {data}
{process}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{port}', shutdown_timeout: 60}}
queue:
  q: {{type: sqlite, relay: out}}
relay:
  out: {{type: blackhole}}
"""


def write_config(tmp: Path, data: Path, port: int, **process: str) -> Path:
    lines = "\n".join(f"    {key}: {value}" for key, value in process.items())
    path = tmp / "slimta.yaml"
    path.write_text(BASE.format(data=data, port=port, process=lines))
    return path


def serve(config: Path) -> subprocess.Popen:
    return subprocess.Popen([*CLI, "serve", "-c", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV, cwd=config.parent)


def ready(proc: subprocess.Popen) -> None:
    """Wait for the line printed once the pid file is written and privileges dropped."""
    for line in proc.stdout:
        if b"SIGTERM or Ctrl-C stops" in line:
            return
    raise AssertionError(proc.communicate())


def stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return out, err


def test_pid_file_written_refused_while_live_removed_at_exit(tmp_path):
    port = free_port()
    pid_file = tmp_path / "run" / "slimta.pid"
    pid_file.parent.mkdir()
    config = write_config(tmp_path, tmp_path / "data", port, pid_file=str(pid_file))
    proc = serve(config)
    try:
        ready(proc)
        with connect(port, proc) as client:
            assert client.noop()[0] == 250
        assert pid_file.read_text() == f"{proc.pid}\n"
        # a second one with the same pid file does not start (and does not touch it)
        other = write_config(tmp_path / "run", tmp_path / "data2", free_port(),
                             pid_file=str(pid_file))
        second = subprocess.run([*CLI, "serve", "-c", str(other)], capture_output=True,
                                text=True, env=ENV, timeout=60)
        assert second.returncode == 1
        assert f"already running as process {proc.pid}" in second.stderr
        assert pid_file.read_text() == f"{proc.pid}\n"
        stop(proc)
        assert not pid_file.exists()
    finally:
        proc.kill()


def test_stale_pid_file_is_replaced(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file = tmp_path / "slimta.pid"
    pid_file.write_text(f"{dead.pid}\n")
    port = free_port()
    proc = serve(write_config(tmp_path, tmp_path / "data", port, pid_file=str(pid_file)))
    try:
        ready(proc)
        with connect(port, proc) as client:
            assert client.noop()[0] == 250
        assert pid_file.read_text() == f"{proc.pid}\n"
        stop(proc)
        assert not pid_file.exists()
    finally:
        proc.kill()


def test_process_check_unit(tmp_path):
    class Settings:
        user = group = None
        pid_file = str(tmp_path / "p.pid")

    Path(Settings.pid_file).write_text(f"{os.getppid()}\n")
    with pytest.raises(ProcessError, match="already running"):
        Process(Settings, str(tmp_path)).check()
    Settings.user = "no-such-user-slimta"
    Path(Settings.pid_file).unlink()
    with pytest.raises(ProcessError, match="no such user 'no-such-user-slimta'"):
        Process(Settings, str(tmp_path)).check()
    assert pid_alive(os.getpid()) and not pid_alive(0)


def test_unknown_user_or_group_does_not_start(tmp_path):
    config = write_config(tmp_path, tmp_path / "data", free_port(), group="no-such-group-x")
    out = subprocess.run([*CLI, "serve", "-c", str(config)], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.returncode == 1
    assert "process.slimta.group: no such group 'no-such-group-x'" in out.stderr


def _status_ids(pid: int) -> dict[str, list[int]]:
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            ids[key] = [int(x) for x in value.split()]
    return ids


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_user_group_dropped_after_binding(tmp_path):
    # nobody must reach the data dir: pytest's tmp_path is private to root
    top = Path(tempfile.mkdtemp(prefix="slimta-priv-"))
    try:
        top.chmod(0o755)
        data = top / "data"
        data.mkdir()
        (data / "old-file").write_text("root's")
        port = free_port()
        proc = serve(write_config(tmp_path, data, port, user="nobody", group="nogroup"))
        try:
            ready(proc)
            with connect(port, proc) as client:
                # the message goes into the SQLite file in the data dir, as nobody
                assert client.sendmail("a@example.net", ["b@example.com"],
                                       b"Subject: hi\r\n\r\nhello\r\n") == {}
            ids = _status_ids(proc.pid)
            assert ids["Uid"] == [65534] * 4
            assert ids["Gid"] == [65534] * 4
            assert ids["Groups"] == [65534]
            assert data.stat().st_uid == 65534
            assert (data / "old-file").stat().st_uid == 65534
            assert (data / "q.db").stat().st_uid == 65534
            stop(proc)
        finally:
            proc.kill()
    finally:
        shutil.rmtree(top)


def test_json_log_lines_without_bodies(tmp_path):
    port = free_port()
    proc = serve(write_config(tmp_path, tmp_path / "data", port, log_format="json",
                              log_level="DEBUG"))
    try:
        with connect(port, proc) as client:
            assert client.sendmail("a@example.net", ["b@example.com"],
                                   b"Subject: hi\r\n\r\nTOP-SECRET-BODY\r\n") == {}
        _, err = stop(proc)
    finally:
        proc.kill()
    assert b"TOP-SECRET-BODY" not in err
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
        assert record["time"].endswith("Z")
    assert any(r["logger"] == "slimta.app" and r["message"] == "stopping" for r in records)


def test_json_formatter_extra_fields_and_secrets():
    record = logging.LogRecord("slimta.test", logging.WARNING, __file__, 1, "hello %s",
                               ("world",), None)
    record.queue_id = "abc"
    record.rcpts = ["a@b"]
    record.password = "hunter2"
    record.auth_token = "xyz"
    record.body = b"the message"
    record.data = "also the message"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "hello world" and out["level"] == "WARNING"
    assert out["logger"] == "slimta.test"
    assert out["queue_id"] == "abc" and out["rcpts"] == ["a@b"]
    assert out["password"] == out["auth_token"] == "********"
    assert out["body"] == "<11 bytes>" and out["data"] == "<16 bytes>"
    assert "hunter2" not in line and "the message" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        record.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc_info"]


def test_process_shutdown_timeout_cuts_off_a_slow_session(tmp_path):
    port = free_port()
    proc = serve(write_config(tmp_path, tmp_path / "data", port, shutdown_timeout=1))
    try:
        connect(port, proc).quit()
        # a client in the middle of a message: the edge alone would wait 60 s for it
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.recv(1000)
        for command in (b"EHLO x\r\n", b"MAIL FROM:<a@example.net>\r\n",
                        b"RCPT TO:<b@example.com>\r\n", b"DATA\r\n"):
            sock.sendall(command)
            time.sleep(0.1)
            sock.recv(1000)
        sock.sendall(b"Subject: slow\r\n\r\nhalf a message")
        time.sleep(0.2)
        started = time.monotonic()
        _, err = stop(proc)
        assert time.monotonic() - started < 15
        assert b"shutdown_timeout (1s) reached" in err
        sock.close()
    finally:
        proc.kill()
