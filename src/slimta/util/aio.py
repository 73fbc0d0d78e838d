"""Small asyncio helpers."""

from __future__ import annotations

import inspect

__all__ = ["maybe_await"]


async def maybe_await(value):
    """``value`` itself, or its result when it is awaitable (user hooks may be either)."""
    if inspect.isawaitable(value):
        return await value
    return value
