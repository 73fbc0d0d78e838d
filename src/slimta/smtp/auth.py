"""SASL for SMTP AUTH (RFC 4954), sans-IO: PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195).

Both sides are here. The client side is :class:`ClientAuth` (PLAIN, LOGIN,
CRAM-MD5 and XOAUTH2), used by :class:`slimta.smtp.client.ClientConnection`;
the server side is :class:`AuthExchange`: one AUTH attempt, fed the client's
lines and answering with the step to take. Challenges come back in clear
text with their base64 form ready (:attr:`Challenge.encoded`). It keeps no
clock and draws no random numbers: the CRAM-MD5 nonce comes from the caller. The result is a
:class:`Credentials` that can check a secret for every mechanism, so a
validator never needs to know which mechanism was used. Mechanisms are small
generators, one per side.

A typical server loop::

    ex = AuthExchange(mech, initial_response, hostname, nonce)
    step = ex.step(None)
    while isinstance(step, Challenge):
        send(Reply('334', step.encoded)); step = ex.step(read_line())
    # Done → handle_auth(reply, step.credentials); Cancelled → 501 5.7.0;
    # Malformed → 501 5.5.2
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Generator

__all__ = [
    "CLIENT_MECHANISMS",
    "PLAINTEXT_MECHANISMS",
    "SERVER_MECHANISMS",
    "AuthExchange",
    "AuthStep",
    "Cancelled",
    "Challenge",
    "ClientAuth",
    "Credentials",
    "Done",
    "Malformed",
]

#: The mechanisms :class:`AuthExchange` implements, in the order to advertise them.
SERVER_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
#: Mechanisms that send the password itself: offer them only over TLS unless allowed.
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})

_HEX_DIGEST_RE = re.compile(r"[0-9a-f]{32}")


def _utf8(secret: str | bytes) -> bytes:
    return secret if isinstance(secret, bytes) else secret.encode("utf-8")


class Credentials:
    """What a client proved it knows, for the server's ``handle_auth`` validator.

    ``mechanism``, ``authcid`` (the user name) and ``authzid`` (the identity
    to act as, or None) are plain attributes. :meth:`check_secret` compares
    the user's real secret with what the client sent, whatever the
    mechanism. For PLAIN and LOGIN the password itself is available as
    :attr:`secret` (for checking against a password hash); CRAM-MD5 never
    sends it. Neither the password nor the digest appears in ``repr``.
    """

    __slots__ = ("_challenge", "_digest", "_secret", "authcid", "authzid", "mechanism")

    def __init__(
        self,
        mechanism: str,
        authcid: str,
        authzid: str | None = None,
        *,
        secret: str | None = None,
        challenge: str | None = None,
        digest: str | None = None,
    ) -> None:
        self.mechanism = mechanism.upper()
        self.authcid = authcid
        self.authzid = authzid or None
        self._secret = secret
        self._challenge = challenge
        self._digest = digest.lower() if digest is not None else None
        if secret is None and (challenge is None or digest is None):
            raise ValueError("Credentials need a secret, or a challenge and its digest")

    @property
    def has_secret(self) -> bool:
        """True when the client sent the password itself (PLAIN, LOGIN)."""
        return self._secret is not None

    @property
    def secret(self) -> str:
        """The password the client sent; AttributeError for CRAM-MD5, which never sends it."""
        if self._secret is None:
            raise AttributeError(f"{self.mechanism} does not reveal the secret")
        return self._secret

    def check_secret(self, secret: str | bytes) -> bool:
        """True if ``secret`` is the one the client used. Constant-time comparison."""
        if self._secret is not None:
            return hmac.compare_digest(_utf8(self._secret), _utf8(secret))
        assert self._challenge is not None and self._digest is not None
        expected = hmac.new(_utf8(secret), self._challenge.encode("utf-8"), "md5").hexdigest()
        return hmac.compare_digest(expected.encode("ascii"), self._digest.encode("ascii"))

    def __repr__(self) -> str:
        return (
            f"Credentials(mechanism={self.mechanism!r}, authcid={self.authcid!r}, "
            f"authzid={self.authzid!r})"
        )

    __str__ = __repr__


# --- the steps of an exchange -------------------------------------------

class AuthStep:
    """What the server does next; see the subclasses. ``kind`` names the subclass."""

    __slots__ = ()
    kind = ""


class Challenge(AuthStep):
    """Send ``334`` and wait for the client's next line.

    ``text`` is the challenge in clear (``'Username:'``, ``'<nonce@host>'``,
    ``''``); ``encoded`` is its base64 form, the exact text to put after
    ``334 ``.
    """

    __slots__ = ("text",)
    kind = "challenge"

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def encoded(self) -> str:
        return base64.b64encode(self.text.encode("utf-8")).decode("ascii")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Challenge) and other.text == self.text

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Challenge({self.text!r})"


class Done(AuthStep):
    """The exchange is complete: pass ``credentials`` to the validator (235 or 535)."""

    __slots__ = ("credentials",)
    kind = "done"

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def __repr__(self) -> str:
        return f"Done({self.credentials!r})"


class Cancelled(AuthStep):
    """The client sent ``*``: reply 501 5.7.0 (authentication cancelled)."""

    __slots__ = ()
    kind = "cancelled"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Cancelled)

    def __hash__(self) -> int:
        return hash(Cancelled)

    def __repr__(self) -> str:
        return "Cancelled()"


class Malformed(AuthStep):
    """Bad base64 or a response of the wrong shape: reply 501 5.5.2. ``reason`` is short."""

    __slots__ = ("reason",)
    kind = "malformed"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Malformed({self.reason!r})"


class _Bad(Exception):
    """Raised inside a mechanism for a malformed response."""


# --- server mechanisms: generators that yield challenges, get responses --

_Mechanism = Generator[str, bytes, Credentials]


def _text(data: bytes, what: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not UTF-8") from None
    if "\x00" in text:
        raise _Bad(f"NUL in {what}")
    return text


def _server_plain(initial: bytes | None, hostname: str, nonce: str) -> _Mechanism:
    data = initial if initial is not None else (yield "")
    parts = data.split(b"\x00")
    if len(parts) != 3:
        raise _Bad("PLAIN response must be authzid NUL authcid NUL password")
    authzid, authcid, password = (_text(p, "PLAIN response") for p in parts)
    if not authcid or not password:
        raise _Bad("empty user name or password")
    return Credentials("PLAIN", authcid, authzid or None, secret=password)


def _server_login(initial: bytes | None, hostname: str, nonce: str) -> _Mechanism:
    user = initial if initial is not None else (yield "Username:")
    username = _text(user, "user name")
    if not username:
        raise _Bad("empty user name")
    password = _text((yield "Password:"), "password")
    if not password:
        raise _Bad("empty password")
    return Credentials("LOGIN", username, secret=password)


def _server_cram_md5(initial: bytes | None, hostname: str, nonce: str) -> _Mechanism:
    if initial is not None:
        raise _Bad("CRAM-MD5 takes no initial response")
    challenge = f"<{nonce}@{hostname}>"
    response = _text((yield challenge), "CRAM-MD5 response")
    username, sep, digest = response.rpartition(" ")
    digest = digest.lower()
    if not sep or not username or not _HEX_DIGEST_RE.fullmatch(digest):
        raise _Bad("CRAM-MD5 response must be user SP hex-digest")
    return Credentials("CRAM-MD5", username, challenge=challenge, digest=digest)


_SERVER = {
    "PLAIN": _server_plain,
    "LOGIN": _server_login,
    "CRAM-MD5": _server_cram_md5,
}


def _b64decode(line: str) -> bytes:
    line = line.strip()
    if line == "=":
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise _Bad("bad base64") from None


class AuthExchange:
    """The server side of one AUTH attempt, without I/O.

    ``AuthExchange(mechanism, initial_response, hostname, nonce)``:
    ``mechanism`` is one of :data:`SERVER_MECHANISMS` (any case; ValueError
    otherwise, so check it and reply 504 5.5.4 first); ``initial_response``
    is the base64 text after the mechanism on the AUTH line (``'='`` means
    empty) or None; ``hostname`` and ``nonce`` make the CRAM-MD5 challenge
    ``<nonce@hostname>``, so the caller supplies the randomness and time
    (e.g. ``f'{secrets.randbits(64)}.{int(time.time())}'``).

    Call :meth:`step` with None first, then with each line the client sends
    (base64, without CRLF) while it answers :class:`Challenge`. It ends with
    :class:`Done`, :class:`Cancelled` or :class:`Malformed`; calling it again
    afterwards is a RuntimeError.
    """

    __slots__ = ("_gen", "_initial", "_started", "finished", "hostname", "mechanism", "nonce")

    def __init__(
        self, mechanism: str, initial_response: str | None, hostname: str, nonce: str
    ) -> None:
        mech = mechanism.upper()
        if mech not in _SERVER:
            raise ValueError(f"unsupported SASL mechanism: {mechanism!r}")
        self.mechanism = mech
        self._initial = initial_response  # holds a password for PLAIN: dropped after use
        self.hostname = hostname
        self.nonce = nonce
        self.finished = False
        self._started = False
        self._gen: _Mechanism | None = None

    def step(self, line: str | None) -> AuthStep:
        """Advance with the client's line (None on the first call); see the class docstring."""
        if self.finished:
            raise RuntimeError("the AUTH exchange is over")
        if not self._started:
            if line is not None:
                raise RuntimeError("the first step takes None")
            self._started = True
            return self._first()
        if line is None:
            raise RuntimeError("after the first step, pass the client's line")
        if line.strip() == "*":
            return self._end(Cancelled())
        assert self._gen is not None
        try:
            return Challenge(self._gen.send(_b64decode(line)))
        except _Bad as exc:
            return self._end(Malformed(str(exc)))
        except StopIteration as stop:
            return self._end(Done(stop.value))

    def _first(self) -> AuthStep:
        initial, self._initial = self._initial, None
        try:
            if initial is not None and initial.strip() == "*":
                return self._end(Cancelled())
            data = None if initial is None else _b64decode(initial)
            self._gen = _SERVER[self.mechanism](data, self.hostname, self.nonce)
            return Challenge(next(self._gen))
        except _Bad as exc:
            return self._end(Malformed(str(exc)))
        except StopIteration as stop:
            return self._end(Done(stop.value))

    def _end(self, step: AuthStep) -> AuthStep:
        self.finished = True
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        return step

    def __repr__(self) -> str:
        return f"AuthExchange({self.mechanism!r}, finished={self.finished})"


# --- the client side ------------------------------------------------------
#
# A client mechanism is a generator: its first value is the initial response
# to send on the AUTH line (None for none); each challenge the server sends
# (decoded from base64) is sent into it and it yields the response. When it
# returns instead, it has nothing more to say and the client cancels ("*").

#: The mechanisms :class:`ClientAuth` implements.
CLIENT_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")

_ClientMechanism = Generator[bytes | None, bytes, None]


def _client_plain(authcid: bytes, secret: bytes, authzid: bytes) -> _ClientMechanism:
    # RFC 4616: [authzid] NUL authcid NUL passwd, as the initial response
    # (RFC 4954 §4), so no 334 round trip is needed.
    yield authzid + b"\x00" + authcid + b"\x00" + secret


def _client_login(authcid: bytes, secret: bytes, authzid: bytes) -> _ClientMechanism:
    # The non-standard LOGIN: the first challenge asks for the user name, the
    # second for the password. The challenge texts vary ("Username:", "User
    # Name"), so only their order is relied on.
    yield None
    yield authcid
    yield secret


def _client_cram_md5(authcid: bytes, secret: bytes, authzid: bytes) -> _ClientMechanism:
    # RFC 2195: user SP lower-case hex HMAC-MD5(secret, challenge)
    challenge = yield None
    digest = hmac.new(secret, challenge, "md5").hexdigest()
    yield authcid + b" " + digest.encode("ascii")


def _client_xoauth2(authcid: bytes, secret: bytes, authzid: bytes) -> _ClientMechanism:
    # Google's XOAUTH2: "user=" authcid ^A "auth=Bearer " token ^A ^A. On
    # failure the server sends a 334 with an error in JSON; the client answers
    # with an empty line and the server then sends the final error reply.
    yield b"user=" + authcid + b"\x01auth=Bearer " + secret + b"\x01\x01"
    yield b""


_CLIENT = {
    "PLAIN": _client_plain,
    "LOGIN": _client_login,
    "CRAM-MD5": _client_cram_md5,
    "XOAUTH2": _client_xoauth2,
}


class ClientAuth:
    """The client side of one AUTH attempt, without I/O.

    ``ClientAuth(mechanism, authcid, secret, authzid=None)``: ``mechanism``
    is one of :data:`CLIENT_MECHANISMS` (any case; ValueError otherwise);
    ``authcid`` is the user name; ``secret`` the password, or for XOAUTH2
    the OAuth 2.0 bearer token; ``authzid`` the identity to act as, which
    only PLAIN can carry (ValueError for the others). Characters a mechanism
    uses as separators (NUL for PLAIN, ^A for XOAUTH2) and line breaks are
    refused with ValueError.

    :meth:`command` gives the AUTH line to send (``'AUTH PLAIN AGEAYg=='``,
    without CRLF); then each ``334`` reply's text goes to :meth:`respond`,
    which gives the line to answer with. Neither the secret nor the lines
    appear in ``repr``.
    """

    __slots__ = ("_gen", "_initial", "finished", "mechanism")

    def __init__(
        self,
        mechanism: str,
        authcid: str,
        secret: str | bytes,
        authzid: str | None = None,
    ) -> None:
        mech = mechanism.upper()
        if mech not in _CLIENT:
            raise ValueError(f"unsupported SASL mechanism: {mechanism!r}")
        if authzid and mech != "PLAIN":
            raise ValueError(f"{mech} cannot carry an authorization identity")
        user = _utf8(authcid)
        key = _utf8(secret)
        zid = _utf8(authzid or "")
        if not user:
            raise ValueError("empty user name")
        for value in (user, key, zid):
            if b"\x00" in value or b"\r" in value or b"\n" in value or (
                    mech == "XOAUTH2" and b"\x01" in value):
                raise ValueError("a separator or line break in the credentials")
        self.mechanism = mech
        #: True once :meth:`respond` has cancelled (answered ``'*'``)
        self.finished = False
        self._gen: _ClientMechanism | None = _CLIENT[mech](user, key, zid)
        self._initial = next(self._gen)

    @property
    def initial_response(self) -> str | None:
        """The base64 initial response for the AUTH line (``'='`` if empty), or None."""
        if self._initial is None:
            return None
        return base64.b64encode(self._initial).decode("ascii") or "="

    def command(self) -> str:
        """The AUTH command line, without CRLF."""
        initial = self.initial_response
        return f"AUTH {self.mechanism}" if initial is None else f"AUTH {self.mechanism} {initial}"

    def respond(self, challenge: str) -> str:
        """The line (without CRLF) that answers a ``334 challenge``.

        ``challenge`` is the reply text after ``334`` (base64; empty is an
        empty challenge). The answer is base64, possibly empty (an empty
        line), or ``'*'`` to cancel the exchange: when the challenge is not
        base64 or the mechanism has already said all it has to say.
        """
        gen = self._gen
        if gen is None:
            return "*"
        try:
            response = gen.send(_b64decode(challenge))
        except (_Bad, StopIteration):
            self._cancel()
            return "*"
        if response is None:  # pragma: no cover - mechanisms yield None only first
            self._cancel()
            return "*"
        return base64.b64encode(response).decode("ascii")

    def _cancel(self) -> None:
        self.finished = True
        if self._gen is not None:
            self._gen.close()
            self._gen = None

    def __repr__(self) -> str:
        return f"ClientAuth({self.mechanism!r}, finished={self.finished})"
