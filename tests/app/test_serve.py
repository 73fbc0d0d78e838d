"""The `slimta serve`, `slimta check` and `slimta config init` commands, as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
COMPAT = Path("/work/shared/compat")


def run(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(ENV, **env), timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str = "a condition", timeout: float = 30.0):
    """The first true value of ``predicate()``, polled every 0.05 s; AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def connect(port: int, proc: subprocess.Popen) -> smtplib.SMTP:
    for _ in range(400):
        try:
            return smtplib.SMTP("127.0.0.1", port, timeout=10)
        except ConnectionRefusedError:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
    raise AssertionError("the server did not start")


GOOD = """
edge:
  in: {type: smtp, queue: q, listener: '127.0.0.1:2525'}
queue:
  q: {type: memory, relay: out}
relay:
  out:
    type: static
    host: smarthost.test
    credentials: {username: me, password: hunter2}
"""


def test_check_good_config_prints_it_masked(tmp_path):
    (tmp_path / "slimta.yaml").write_text(GOOD)
    out = run("check", "-c", str(tmp_path / "slimta.yaml"))
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "********" in out.stdout
    assert "smarthost.test" in out.stdout and "max_size: 10485760" in out.stdout
    assert "OK" in out.stderr


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("queue: q,", "queue: nope,"), "slimta.yaml:3: edge.in.queue: no queue named"),
    (GOOD.replace("type: static", "type: statik"), "unknown relay type 'statik'"),
    (GOOD + "  x: {type: custom, factory: 'no_such_mod:f'}\n",
     "relay.x.factory: cannot load factory 'no_such_mod:f'"),
], ids=["reference", "type", "factory"])
def test_check_broken_config(tmp_path, text, message):
    (tmp_path / "slimta.yaml").write_text(text)
    out = run("check", "-c", str(tmp_path / "slimta.yaml"))
    assert out.returncode == 1
    assert message in out.stderr
    assert out.stdout == ""


def test_check_embedded_default():
    out = run("check")
    assert out.returncode == 0, out.stderr
    assert "submission_users" in out.stdout


def test_config_init(tmp_path):
    out = run("config", "init", str(tmp_path / "etc"))
    assert out.returncode == 0, out.stderr
    written = tmp_path / "etc/slimta.yaml"
    assert written.read_text().startswith("# slimta")
    assert run("check", "-c", str(written)).returncode == 0
    written.write_text("# mine\n")
    out = run("config", "init", str(tmp_path / "etc"))
    assert out.returncode == 1 and "--force" in out.stderr
    assert written.read_text() == "# mine\n"
    assert run("config", "init", "--force", str(tmp_path / "etc")).returncode == 0
    assert written.read_text().startswith("# slimta")


def test_serve_compat_sample_and_sigterm(tmp_path):
    if not COMPAT.is_dir():
        pytest.skip("no compat sample")
    for f in COMPAT.iterdir():
        shutil.copy(f, tmp_path / f.name)
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "serve", "-c", str(tmp_path / "slimta.yaml.sample"),
         "--listen", f"inbound=127.0.0.1:{port}",
         "--listen", f"outbound=127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path)
    try:
        with connect(port, proc) as client:
            assert client.sendmail("a@example.net", ["abuse@example.com"],
                                   b"Subject: hi\r\n\r\nhello\r\n") == {}
        proc.send_signal(signal.SIGHUP)  # not fatal
        time.sleep(0.3)
        with connect(port, proc) as client:
            assert client.noop()[0] == 250
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"inbound: SMTP on 127.0.0.1:{port}".encode() in out
    finally:
        proc.kill()


def test_serve_no_relay_then_no_edge_share_the_queue(tmp_path):
    """An edge-only process stores; a relay-only process over the same file delivers."""
    config = tmp_path / "slimta.yaml"
    config.write_text(f"""
process:
  slimta: {{data_dir: data}}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{free_port()}'}}
queue:
  q: {{type: sqlite, relay: md}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
""")
    port = int(config.read_text().split("127.0.0.1:")[1].split("'")[0])
    proc = subprocess.Popen([*CLI, "serve", "-c", str(config), "--no-relay"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        with connect(port, proc) as client:
            assert client.sendmail("a@example.net", ["b@example.org"], b"\r\nbody\r\n") == {}
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        proc.kill()
    assert not (tmp_path / "data/mail").exists()
    proc = subprocess.Popen([*CLI, "serve", "-c", str(config), "--no-edge"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        new = tmp_path / "data/mail/new"
        for _ in range(400):
            if new.is_dir() and any(new.iterdir()):
                break
            time.sleep(0.05)
        assert b"body" in next(new.iterdir()).read_bytes()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        proc.kill()


def test_serve_bad_config_and_port_in_use(tmp_path):
    (tmp_path / "slimta.yaml").write_text("edge: {in: {type: smtp}}\n")
    out = run("serve", "-c", str(tmp_path / "slimta.yaml"))
    assert out.returncode == 1 and "edge.in.queue: required key missing" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (tmp_path / "slimta.yaml").write_text(GOOD.replace("2525", str(port)))
        out = run("serve", "-c", str(tmp_path / "slimta.yaml"))
        assert out.returncode == 1 and "cannot listen" in out.stderr


def test_serve_unusable_data_dir(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    bad_dir = str(tmp_path / "file/x")
    out = run("serve", "--listen", f"127.0.0.1:{free_port()}",
              "--listen", f"submission=127.0.0.1:{free_port()}",
              "--admin", f"127.0.0.1:{free_port()}", "--data-dir", bad_dir, cwd=tmp_path)
    assert out.returncode == 1
    assert "slimta: cannot start" in out.stderr and "Traceback" not in out.stderr
    # no first user to make: the SQLite queue is what fails
    (tmp_path / "c.yaml").write_text(f"""
edge: {{in: {{type: smtp, queue: q, listener: '127.0.0.1:{free_port()}'}}}}
queue: {{q: {{type: sqlite}}}}
""")
    out = run("serve", "-c", str(tmp_path / "c.yaml"), "--data-dir", bad_dir)
    assert out.returncode == 1
    assert "slimta: cannot start" in out.stderr and "Traceback" not in out.stderr


def test_serve_no_relay_and_no_edge_at_once_share_the_queue(tmp_path):
    """An edge-only and a delivering process run together over one SQLite file."""
    port = free_port()
    config = tmp_path / "slimta.yaml"
    config.write_text(f"""
process:
  slimta: {{data_dir: data}}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{port}'}}
queue:
  q: {{type: sqlite, relay: md}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
""")
    edge = subprocess.Popen([*CLI, "serve", "-c", str(config), "--no-relay"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deliver = None
    try:
        with connect(port, edge) as client:
            client.sendmail("a@example.net", ["b@example.org"], b"\r\nfirst\r\n")
            deliver = subprocess.Popen([*CLI, "serve", "-c", str(config), "--no-edge"],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
            new = tmp_path / "data/mail/new"
            for _ in range(400):
                if new.is_dir() and any(new.iterdir()):
                    break
                time.sleep(0.05)
            # stored while the delivering process runs: it finds this one by polling
            for n in range(5):
                client.sendmail("a@example.net", ["b@example.org"], f"\r\nlater {n}\r\n".encode())
        bodies = []
        for _ in range(400):
            bodies = [p.read_bytes() for p in new.iterdir()]
            if len(bodies) == 6:
                break
            time.sleep(0.05)
        assert len(bodies) == 6
        assert sum(b"later" in b for b in bodies) == 5
        for proc in (edge, deliver):
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
            assert proc.returncode == 0
    finally:
        edge.kill()
        if deliver is not None:
            deliver.kill()
