"""DictLookup: records in a mapping in memory (or any mapping, such as a ``shelve``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slimta.lookup import Lookup, as_record

__all__ = ["DictLookup"]


class DictLookup(Lookup):
    """Records from ``mapping``, found under the key ``key_template`` makes.

    ``DictLookup({'example.com': {'relay': 'mx.example.net'}}, '{domain}')``.
    The values must be mappings; each lookup returns a copy, so a caller may
    change it.
    """

    def __init__(self, mapping: Mapping[str, Any], key_template: str) -> None:
        super().__init__(key_template)
        self.mapping = mapping

    async def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        key = self.format_key(**kwargs)
        return as_record(self.mapping.get(key), f"DictLookup[{key!r}]")
