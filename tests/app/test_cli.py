"""The slimta command: --version, and `serve` with no config (the embedded default)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time

import slimta

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def test_version():
    out = subprocess.run([*CLI, "--version"], capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 0
    assert slimta.__version__ in out.stdout.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_accepts_mail_and_stops_on_sigterm(tmp_path):
    port = free_port()
    # the embedded default, its listeners moved to free ports
    proc = subprocess.Popen([*CLI, "serve", "--listen", f"127.0.0.1:{port}",
                             "--listen", f"submission=127.0.0.1:{free_port()}",
                             "--admin", f"127.0.0.1:{free_port()}", "--hostname", "mx.test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
                            env=dict(ENV, SLIMTA_DATA_DIR=str(tmp_path / "data")))
    try:
        for _ in range(200):
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        with client:
            refused = client.sendmail("a@example.com", ["b@localhost"],
                                      b"Subject: hi\r\n\r\nhello\r\n")
            assert refused == {}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert b"SMTP on 127.0.0.1" in out
        assert b"to=<b@localhost> delivered" in err
        assert len(list((tmp_path / "data/Maildir/localhost/b/new").iterdir())) == 1
    finally:
        proc.kill()
