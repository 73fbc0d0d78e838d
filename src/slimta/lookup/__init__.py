"""Lookups: find the record that belongs to an address, a user or a domain.

A lookup turns keyword arguments into a record (a ``dict``) or ``None``::

    lookup = DictLookup({'alice@example.com': {'alias': 'al@example.net'}}, '{address}')
    record = await lookup.lookup(address='alice@example.com')

Most drivers build the key they look for from a *key template*, a
:meth:`str.format` string filled from the keyword arguments (``'{address}'``,
``'{localpart}'``, ``'{domain}'``, ``'{username}'``, ...). The SQL driver passes
the keyword arguments to its query as named parameters instead.
:meth:`Lookup.lookup_address` fills ``address``, ``localpart`` and ``domain``
from one address.

Drivers, one per module: :class:`~slimta.lookup.dict.DictLookup`,
:class:`~slimta.lookup.regex.RegexLookup`, :class:`~slimta.lookup.sql.SqlLookup`
(SQLite and PostgreSQL), :class:`~slimta.lookup.redis.RedisLookup`. A backend
that cannot answer (server down, bad data) raises :class:`LookupError`, so the
caller can tell "no record" (``None``) from "don't know" (an exception).
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any

__all__ = ["Lookup", "LookupError", "address_kwargs"]


class LookupError(builtins.LookupError):
    """A lookup could not be answered: backend unreachable, bad template or bad record.

    Not raised for a key that has no record: that is ``None``.
    """


def address_kwargs(address: str) -> dict[str, str]:
    """``address``, ``localpart`` and ``domain`` of ``address`` (split at the last ``@``).

    An address without ``@`` has itself as local part and ``''`` as domain.
    """
    localpart, at, domain = address.rpartition("@")
    if not at:
        localpart, domain = address, ""
    return {"address": address, "localpart": localpart, "domain": domain}


class Lookup:
    """Base of the lookup drivers.

    Subclasses implement :meth:`lookup`; those that look for one key build it
    with :meth:`format_key` from ``key_template``. ``close()`` releases the
    backend's connections; ``async with lookup:`` calls it at the end.
    """

    def __init__(self, key_template: str | None = None) -> None:
        self.key_template = key_template

    def format_key(self, **kwargs: Any) -> str:
        """``key_template`` filled from ``kwargs``; :class:`LookupError` for a missing name."""
        if self.key_template is None:
            raise LookupError(f"{type(self).__name__} has no key template")
        try:
            return self.key_template.format_map(kwargs)
        except (KeyError, IndexError, AttributeError, ValueError) as exc:
            raise LookupError(
                f"key template {self.key_template!r} cannot be filled: {exc!r}"
            ) from exc

    async def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        """The record for ``kwargs``, or ``None`` when there is none."""
        raise NotImplementedError

    async def lookup_address(self, address: str, **kwargs: Any) -> dict[str, Any] | None:
        """:meth:`lookup` with ``address``, ``localpart`` and ``domain`` taken from ``address``."""
        return await self.lookup(**address_kwargs(address), **kwargs)

    async def close(self) -> None:
        """Release the backend's resources (connections, pools). Nothing by default."""

    async def __aenter__(self) -> Lookup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def as_record(value: Any, where: str) -> dict[str, Any] | None:
    """``value`` as a new dict, ``None`` as ``None``; :class:`LookupError` for anything else."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        # builtins.dict: importing the submodule slimta.lookup.dict binds the
        # name ``dict`` in this package's namespace
        return builtins.dict(value)
    raise LookupError(f"{where}: the record is a {type(value).__name__}, not a mapping")
