"""slimta: a mail transfer agent toolkit and daemon on asyncio."""

from __future__ import annotations

__version__ = "0.1.0"
