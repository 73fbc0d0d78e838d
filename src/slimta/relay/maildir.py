"""MaildirRelay: deliver into a local Maildir, durably."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time

from slimta.relay import Relay, TransientRelayError
from slimta.smtp.reply import Reply

__all__ = ["MaildirRelay"]


class MaildirRelay(Relay):
    """Writes each message once into the Maildir at ``path`` (created if missing).

    The file is written in ``tmp/``, fsynced, and renamed into ``new/`` (the
    Maildir protocol), and the directory is fsynced too, so a delivery that
    returned survives a crash. A ``Return-Path:`` header with the sender is
    added in front. Failures to write are transient (451 4.3.0).
    """

    def __init__(self, path: str, fsync: bool = True):
        super().__init__()
        self.path = path
        self.fsync = fsync
        self._seq = itertools.count()
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")

    async def _attempt(self, envelope, attempts: int):
        header, body = envelope.flatten()
        data = f"Return-Path: <{envelope.sender}>\r\n".encode() + header + body
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            raise TransientRelayError(
                str(exc), Reply("451", "4.3.0 Could not write to the mailbox")) from exc
        return None

    def _write(self, data: bytes) -> str:
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(self.path, sub), exist_ok=True)
        now = time.time()
        name = f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._seq)}.{self._host}"
        tmp = os.path.join(self.path, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        final = os.path.join(self.path, "new", name)
        os.rename(tmp, final)
        if self.fsync:
            fd = os.open(os.path.join(self.path, "new"), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return final
