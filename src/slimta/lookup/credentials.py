"""Password checks for SMTP AUTH against records from a lookup.

:func:`verify_password` checks a password against a stored value in Dovecot's
``{SCHEME}`` notation:

=====================  ======================================================
``{PLAIN}secret``      the password itself (also ``{CLEAR}``, ``{CLEARTEXT}``)
``{ARGON2ID}$argon2id$…``  Argon2id (also ``{ARGON2I}``)
``{BLF-CRYPT}$2y$…``   bcrypt (``$2a$``, ``$2b$``, ``$2y$``; as in Dovecot, only the
                       first 72 bytes of the password count)
``{SHA512-CRYPT}$6$…`` SHA-512 crypt (also ``{SHA256-CRYPT}`` ``$5$``, ``{MD5-CRYPT}`` ``$1$``)
``{SSHA512}…``         salted SHA-512, base64 (also ``{SSHA256}``, ``{SSHA}``,
                       and unsalted ``{SHA512}``, ``{SHA256}``, ``{SHA}``;
                       a ``.HEX`` or ``.B64`` suffix picks the encoding)
=====================  ======================================================

A stored value without a prefix is recognised by its crypt form (``$argon2id$``,
``$2b$``, ``$6$``, ...); anything else is taken as ``default_scheme``
(``PLAIN``). Every comparison of secrets is constant-time
(:func:`hmac.compare_digest` or the hashing library's own). The crypt
schemes use libpass (the maintained fork of passlib, imported as ``passlib``),
argon2-cffi and bcrypt. Not the original passlib 1.7.4 (2020, unmaintained):
it logs a trapped error reading the version of bcrypt 4.1+, and with bcrypt 5
every bcrypt hash or check raises ValueError (its self-test hashes a password
longer than 72 bytes). Both install the ``passlib`` package: have only libpass.

:class:`LookupCredentials` is the ``handle_auth`` half of a validator::

    class Validators(SmtpValidators):
        auth = LookupCredentials(SqlLookup('users.db',
                                 'SELECT password FROM users WHERE name = :username'))

        async def handle_auth(self, reply, creds):
            await self.auth.handle_auth(reply, creds)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from typing import Any

from slimta.lookup import Lookup, LookupError, address_kwargs
from slimta.smtp.reply import Reply

__all__ = [
    "LookupCredentials",
    "UnknownSchemeError",
    "split_scheme",
    "verify_password",
    "verify_password_async",
]

log = logging.getLogger(__name__)


class UnknownSchemeError(ValueError):
    """The stored password names a ``{SCHEME}`` this module does not know."""


_PLAIN = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})
# Dovecot scheme -> passlib handler name.
_CRYPT = {
    "ARGON2ID": "argon2",
    "ARGON2I": "argon2",
    "BLF-CRYPT": "bcrypt",
    "BCRYPT": "bcrypt",
    "SHA512-CRYPT": "sha512_crypt",
    "SHA256-CRYPT": "sha256_crypt",
    "MD5-CRYPT": "md5_crypt",
}
# Crypt forms recognised without a prefix.
_CRYPT_PREFIXES = (
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
    ("$2a$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$1$", "MD5-CRYPT"),
)
# SHA family: scheme -> (hashlib name, salted).
_DIGESTS = {
    "SHA": ("sha1", False),
    "SHA1": ("sha1", False),
    "SHA256": ("sha256", False),
    "SHA512": ("sha512", False),
    "SSHA": ("sha1", True),
    "SSHA256": ("sha256", True),
    "SSHA512": ("sha512", True),
}


def split_scheme(stored: str, default_scheme: str = "PLAIN") -> tuple[str, str]:
    """``(SCHEME, value)`` of a stored password: from its ``{SCHEME}`` prefix, its crypt form,
    or ``default_scheme``."""
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            return stored[1:end].upper(), stored[end + 1:]
    for prefix, scheme in _CRYPT_PREFIXES:
        if stored.startswith(prefix):
            return scheme, stored
    return default_scheme.upper(), stored


def _verify_digest(name: str, salted: bool, encoding: str, value: str, given: bytes) -> bool:
    try:
        raw = bytes.fromhex(value) if encoding == "HEX" else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        log.warning("stored %s password is not valid %s", name, encoding)
        return False
    size = hashlib.new(name).digest_size
    if len(raw) < size or (not salted and len(raw) != size):
        log.warning("stored %s password has the wrong length", name)
        return False
    digest, salt = raw[:size], raw[size:]
    return hmac.compare_digest(hashlib.new(name, given + salt).digest(), digest)


def verify_password(stored: str, given: str | bytes, default_scheme: str = "PLAIN") -> bool:
    """True when ``given`` is the password ``stored`` (in ``{SCHEME}`` notation) describes.

    Raises :class:`UnknownSchemeError` for a scheme it does not know; a stored
    value that is malformed for its scheme is logged and never matches. The
    crypt schemes are slow on purpose (tens of milliseconds): from a coroutine,
    use :func:`verify_password_async`.
    """
    given_bytes = given if isinstance(given, bytes) else given.encode("utf-8")
    scheme, value = split_scheme(stored, default_scheme)
    if scheme in _PLAIN:
        return hmac.compare_digest(value.encode("utf-8"), given_bytes)
    base, _, encoding = scheme.partition(".")
    if base in _DIGESTS:
        name, salted = _DIGESTS[base]
        return _verify_digest(name, salted, encoding or "B64", value, given_bytes)
    if scheme in _CRYPT:
        from passlib import hash as passlib_hash

        handler = getattr(passlib_hash, _CRYPT[scheme])
        if handler.name == "bcrypt":
            # bcrypt uses only the first 72 bytes; Dovecot (crypt_blowfish)
            # truncates silently, the bcrypt module refuses longer passwords
            given_bytes = given_bytes[:72]
        try:
            return bool(handler.verify(given_bytes, value))
        except (ValueError, TypeError) as exc:
            log.warning("stored %s password is malformed: %s", scheme, exc)
            return False
    raise UnknownSchemeError(f"unknown password scheme {{{scheme}}}")


async def verify_password_async(
    stored: str, given: str | bytes, default_scheme: str = "PLAIN"
) -> bool:
    """:func:`verify_password` in a worker thread, so slow hashes do not stall the event loop."""
    scheme, _ = split_scheme(stored, default_scheme)
    if scheme in _PLAIN:
        return verify_password(stored, given, default_scheme)
    return await asyncio.to_thread(verify_password, stored, given, default_scheme)


class LookupCredentials:
    """Checks SMTP AUTH credentials against the password in a lookup's record.

    The lookup is given ``username`` (the AUTH user name, ``creds.authcid``)
    and, for a user name with ``@``, ``address``, ``localpart`` and
    ``domain``; the record's ``password_field`` holds the stored password
    (see :func:`verify_password`). For PLAIN and LOGIN the password the client
    sent is checked against it, whatever the scheme. CRAM-MD5 never sends the
    password, so it can be checked only against a ``{PLAIN}`` stored secret
    (:meth:`~slimta.smtp.auth.Credentials.check_secret`); against a hash it
    fails. An authorization identity other than the user name fails too
    (``allow_authzid=True`` leaves that to the caller). With
    ``dummy_password`` (a stored password in the scheme your users have), an
    unknown user's password is checked against it and refused anyway, so an
    unknown user takes as long as a known one and the time of the answer
    does not tell which user names exist.

    :meth:`handle_auth` sets the reply: ``535 5.7.8`` (``failed_reply``) for an
    unknown user, a wrong password, or an unknown scheme; ``454 4.7.0``
    (``temp_reply``) when the lookup fails. :meth:`check` returns the user's
    record (or ``None``) for callers that want it.
    """

    failed_reply = ("535", "5.7.8 Authentication credentials invalid")
    temp_reply = ("454", "4.7.0 Temporary authentication failure")

    def __init__(
        self,
        lookup: Lookup,
        password_field: str = "password",
        *,
        default_scheme: str = "PLAIN",
        allow_authzid: bool = False,
        dummy_password: str | None = None,
    ) -> None:
        self.lookup = lookup
        self.dummy_password = dummy_password
        self.password_field = password_field
        self.default_scheme = default_scheme
        self.allow_authzid = allow_authzid

    async def check(self, creds: Any) -> dict[str, Any] | None:
        """The user's record when ``creds`` are right, else ``None``.

        Raises :class:`~slimta.lookup.LookupError` when the lookup fails.
        """
        authcid = creds.authcid
        if creds.authzid and creds.authzid != authcid and not self.allow_authzid:
            log.info("AUTH as %r by %r refused: authzid differs", creds.authzid, authcid)
            return None
        kwargs: dict[str, Any] = {"username": authcid}
        if "@" in authcid:
            kwargs.update(address_kwargs(authcid))
        record = await self.lookup.lookup(**kwargs)
        stored = record.get(self.password_field) if record else None
        if not isinstance(stored, str) or not stored:
            if self.dummy_password is not None and creds.has_secret:
                await verify_password_async(self.dummy_password, creds.secret)
            log.info("AUTH for %r refused: no such user", authcid)
            return None
        if creds.has_secret:
            try:
                ok = await verify_password_async(stored, creds.secret, self.default_scheme)
            except UnknownSchemeError as exc:
                log.error("AUTH for %r refused: %s", authcid, exc)
                return None
        else:
            scheme, value = split_scheme(stored, self.default_scheme)
            if scheme not in _PLAIN:
                log.warning(
                    "AUTH %s for %r refused: needs a {PLAIN} stored secret, not {%s}",
                    creds.mechanism, authcid, scheme,
                )
                return None
            ok = creds.check_secret(value)
        if not ok:
            log.info("AUTH %s for %r refused: wrong password", creds.mechanism, authcid)
            return None
        return record

    async def handle_auth(self, reply: Reply, creds: Any) -> dict[str, Any] | None:
        """Set ``reply`` to a failure unless ``creds`` are right; return the user's record."""
        try:
            record = await self.check(creds)
        except LookupError as exc:
            log.error("AUTH for %r: lookup failed: %s", creds.authcid, exc)
            reply.code, reply.message = self.temp_reply
            return None
        if record is None:
            reply.code, reply.message = self.failed_reply
        return record
