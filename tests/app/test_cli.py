"""The slimta command: --version and the stand-in `serve`."""

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


def test_serve_accepts_mail_and_stops_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*CLI, "serve", "--listen", f"127.0.0.1:{port}",
                             "--hostname", "mx.test"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        for _ in range(200):
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        with client:
            refused = client.sendmail("a@example.com", ["b@example.com"],
                                      b"Subject: hi\r\n\r\nhello\r\n")
            assert refused == {}
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert b"SMTP on 127.0.0.1" in out
        assert b"from=<a@example.com> to=<b@example.com>" in err
    finally:
        proc.kill()
