"""A queue that keeps messages in memory and logs them: the stand-in until the real Queue lands."""

from __future__ import annotations

import itertools
import logging

__all__ = ["LoggingMemoryQueue"]

log = logging.getLogger(__name__)


class LoggingMemoryQueue:
    """Accepts every envelope, keeps the last ``keep`` of them, logs one line each.

    Nothing is written to disk: a message accepted here is lost when the
    process ends. For trying the edge out, not for real mail.
    """

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.envelopes: list = []
        self._ids = itertools.count(1)

    async def enqueue(self, envelope) -> list:
        qid = f"m{next(self._ids):08d}"
        self.envelopes.append(envelope)
        if len(self.envelopes) > self.keep:
            del self.envelopes[0]
        header, body = envelope.flatten()
        log.info("id=%s from=<%s> to=%s size=%d client=%s", qid, envelope.sender,
                 ",".join(f"<{r}>" for r in envelope.recipients), len(header) + len(body),
                 (envelope.client or {}).get("ip"))
        return [(envelope, qid)]
