"""RegexLookup: the first of an ordered list of regular expressions that matches the key."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from slimta.lookup import Lookup, as_record

__all__ = ["RegexLookup"]


class RegexLookup(Lookup):
    """Records from ``rules``: ``(pattern, record)`` pairs tried in order (a Postfix regexp table).

    The key ``key_template`` makes is searched (:func:`re.search`; anchor a
    pattern with ``^``/``$`` to match the whole key) with each pattern in
    turn; the first match gives its record. Patterns are strings (compiled
    case-insensitively unless ``flags`` says otherwise) or compiled patterns.
    With ``groups=True``, the match's named groups are added to the returned
    record (``(?P<user>[^@]+)@example\\.com`` gives ``{'user': ...}``).
    :meth:`add` appends a rule.
    """

    def __init__(
        self,
        rules: Iterable[tuple[str | re.Pattern[str], Mapping[str, Any]]] = (),
        key_template: str = "{address}",
        *,
        flags: int = re.IGNORECASE,
        groups: bool = False,
    ) -> None:
        super().__init__(key_template)
        self.flags = flags
        self.groups = groups
        self.rules: list[tuple[re.Pattern[str], Mapping[str, Any]]] = []
        for pattern, record in rules:
            self.add(pattern, record)

    def add(self, pattern: str | re.Pattern[str], record: Mapping[str, Any]) -> None:
        """Append a rule: ``record`` for keys that ``pattern`` matches."""
        if isinstance(pattern, str):
            pattern = re.compile(pattern, self.flags)
        as_record(record, f"RegexLookup rule {pattern.pattern!r}")
        self.rules.append((pattern, record))

    async def lookup(self, **kwargs: Any) -> dict[str, Any] | None:
        key = self.format_key(**kwargs)
        for pattern, record in self.rules:
            match = pattern.search(key)
            if match is not None:
                result = dict(record)
                if self.groups:
                    result.update({k: v for k, v in match.groupdict().items() if v is not None})
                return result
        return None
