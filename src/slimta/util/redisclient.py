"""The Redis client shared by the Redis-backed stores (rate counters,
greylist times): a URL or a ready ``redis.asyncio.Redis`` client, and a
``prefix`` put before every key."""

from __future__ import annotations

from typing import Any

__all__ = ["RedisClientOwner"]


class RedisClientOwner:
    """Holds ``self.client`` and ``self.prefix``.

    ``redis`` is a URL (the client is created here, and :meth:`aclose`
    closes it) or a ``redis.asyncio.Redis`` client (left to its owner).
    """

    def __init__(self, redis: Any, prefix: str):
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            self.client = aioredis.Redis.from_url(redis)
            self._owned = True
        else:
            self.client = redis
            self._owned = False
        self.prefix = prefix

    async def aclose(self) -> None:
        """Close the client if it was created here from a URL."""
        if self._owned:
            await self.client.aclose()
