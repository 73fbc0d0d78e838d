"""slimta: a mail transfer agent toolkit and daemon on asyncio."""

from __future__ import annotations

from slimta.service import run_forever

__version__ = "0.1.0"
__all__ = ["__version__", "run_forever"]
