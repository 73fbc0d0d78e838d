"""Postfix's smtp-sink as a test peer: a real SMTP/LMTP server that dumps what it receives."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

from daemons import free_port, stop_process


class SmtpSink:
    """``smtp-sink -u nobody -d DIR/msg. [options] 127.0.0.1:PORT`` until stop()."""

    def __init__(self, binary: str, options: list[str], host: str = "127.0.0.1",
                 port: int | None = None):
        # smtp-sink writes as the -u user, who cannot enter pytest's private tmp_path
        self.directory = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.directory, 0o777)
        self.host = host
        self.port = port or free_port()
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [binary, *user, "-d", os.path.join(self.directory, "msg."), *options,
             f"{host}:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((host, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("smtp-sink did not start")

    def messages(self) -> list[dict]:
        """Every dumped transaction: sender, recipients, data (CRLF), mail_args, rcpt_args."""
        out = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                out.append(parse_dump(f.read()))
        return out

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.directory, ignore_errors=True)


def parse_dump(raw: bytes) -> dict:
    """Parse a dump: X-Mail-From:/X-Rcpt-To: lines, smtp-sink's Received: header, the message."""
    lines = raw.split(b"\n")
    sender = None
    rcpts = []
    mail_args = ""
    rcpt_args = []
    i = 0
    while i < len(lines):
        m = re.match(rb"^X-([A-Za-z-]+): ?(.*)$", lines[i])
        if not m:
            break
        key, value = m.group(1).lower(), m.group(2).decode()
        path = re.match(r"<([^>]*)>", value)
        if key == b"mail-args":
            mail_args = value
            sender = path.group(1) if path else value
        elif key == b"rcpt-args":
            rcpt_args.append(value)
            rcpts.append(path.group(1) if path else value)
        i += 1
    # smtp-sink adds its own Received: header (with tab continuations)
    if i < len(lines) and lines[i].startswith(b"Received:"):
        i += 1
        while i < len(lines) and lines[i].startswith(b"\t"):
            i += 1
    body = b"\r\n".join(lines[i:])
    if body.endswith(b"\r\n"):
        body = body[:-2]
    return {"sender": sender, "recipients": rcpts, "data": body, "mail_args": mail_args,
            "rcpt_args": rcpt_args}

