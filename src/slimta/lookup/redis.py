"""RedisLookup: a record stored in Redis as a JSON string or as a hash."""

from __future__ import annotations

import json
from typing import Any

from slimta.lookup import Lookup, LookupError, as_record

__all__ = ["RedisLookup"]

_KINDS = ("string-json", "hash")


class RedisLookup(Lookup):
    """The record under the Redis key ``key_template`` makes (redis-py's asyncio client).

    ``kind='string-json'`` (default): the key holds a JSON object
    (``SET user:alice '{"password": "..."}'``). ``kind='hash'``: the key is a
    hash whose fields are the record (``HSET user:alice password ...``); its
    values are strings. A missing key is ``None``; an unreachable server,
    a value that is not a JSON object, or a key of the wrong type raises
    :class:`~slimta.lookup.LookupError`. ``url`` is a ``redis://`` URL
    (``redis://127.0.0.1:6379/0``); ``client`` may be given instead, an
    existing ``redis.asyncio.Redis`` made with ``decode_responses=True``
    (then :meth:`close` leaves it open). The client made from ``url`` is created
    on first use, in the running event loop.
    """

    def __init__(
        self,
        url: str | None = None,
        key_template: str = "{address}",
        kind: str = "string-json",
        *,
        client: Any = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(key_template)
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, not {kind!r}")
        if url is None and client is None:
            raise ValueError("RedisLookup needs a url or a client")
        self.url = url
        self.kind = kind
        self.timeout = timeout
        self._client = client
        self._owns_client = client is None

    def _get_client(self) -> Any:
        if self._client is None:
            import redis.asyncio

            self._client = redis.asyncio.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
            )
        return self._client

    async def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        import redis.exceptions

        key = self.format_key(**kwargs)
        client = self._get_client()
        try:
            if self.kind == "hash":
                fields = await client.hgetall(key)
                return dict(fields) if fields else None
            raw = await client.get(key)
        except redis.exceptions.RedisError as exc:
            raise LookupError(f"Redis lookup of {key!r} failed: {exc}") from exc
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise LookupError(f"Redis key {key!r} does not hold JSON: {exc}") from exc
        return as_record(value, f"Redis key {key!r}")

    async def close(self) -> None:
        """Close the client this lookup made (not one it was given)."""
        client = self._client
        if client is not None and self._owns_client:
            self._client = None
            await client.aclose()
