"""Tests for slimta.lookup.credentials: password schemes, LookupCredentials, and SMTP AUTH
end to end (smtplib -> SmtpEdge whose handle_auth uses LookupCredentials).

Hashes are made in the tests by independent generators where there is one
(argon2-cffi, the bcrypt module, ``openssl passwd``, hashlib).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import smtplib
import subprocess

import argon2
import bcrypt
import pytest

from slimta.edge.smtp import SmtpValidators
from slimta.lookup import LookupError
from slimta.lookup.credentials import (
    LookupCredentials,
    UnknownSchemeError,
    split_scheme,
    verify_password,
    verify_password_async,
)
from slimta.lookup.dict import DictLookup
from slimta.smtp.auth import Credentials
from slimta.smtp.reply import Reply

PASSWORD = "correct horse battery"  # ASCII: smtplib's CRAM-MD5 encodes it so
WRONG = "correct horse"
UNICODE = "pässwörd ✓"


def openssl_crypt(flag: str, password: str) -> str:
    out = subprocess.run(["openssl", "passwd", flag, "-salt", "saltsalt", "-stdin"],
                         input=password.encode(), capture_output=True, check=True)
    return out.stdout.decode().strip()


def ssha(name: str, password: str, salt: bytes = b"\x01\x02\x03\x04salt") -> str:
    return base64.b64encode(hashlib.new(name, password.encode() + salt).digest() + salt).decode()


def stored_passwords() -> dict[str, str]:
    return {
        "PLAIN": "{PLAIN}" + PASSWORD,
        "CLEAR": "{CLEAR}" + PASSWORD,
        "ARGON2ID": "{ARGON2ID}" + argon2.PasswordHasher(
            time_cost=1, memory_cost=8192, type=argon2.Type.ID).hash(PASSWORD),
        "ARGON2I": "{ARGON2I}" + argon2.PasswordHasher(
            time_cost=1, memory_cost=8192, type=argon2.Type.I).hash(PASSWORD),
        # Dovecot writes bcrypt as $2y$
        "BLF-CRYPT": "{BLF-CRYPT}" + bcrypt.hashpw(
            PASSWORD.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1),
        "BLF-CRYPT-2b": "{BLF-CRYPT}" + bcrypt.hashpw(
            PASSWORD.encode(), bcrypt.gensalt(4)).decode(),
        "SHA512-CRYPT": "{SHA512-CRYPT}" + openssl_crypt("-6", PASSWORD),
        "SHA256-CRYPT": "{SHA256-CRYPT}" + openssl_crypt("-5", PASSWORD),
        "MD5-CRYPT": "{MD5-CRYPT}" + openssl_crypt("-1", PASSWORD),
        "SSHA": "{SSHA}" + ssha("sha1", PASSWORD),
        "SSHA256": "{SSHA256}" + ssha("sha256", PASSWORD),
        "SSHA512": "{SSHA512}" + ssha("sha512", PASSWORD),
        "SSHA512.HEX": "{SSHA512.HEX}" + base64.b64decode(ssha("sha512", PASSWORD)).hex(),
        "SHA256": "{SHA256}" + base64.b64encode(
            hashlib.sha256(PASSWORD.encode()).digest()).decode(),
        "lowercase": "{ssha256}" + ssha("sha256", PASSWORD),
    }


STORED = stored_passwords()


@pytest.mark.parametrize("scheme", sorted(STORED))
def test_every_scheme_right_and_wrong(scheme):
    stored = STORED[scheme]
    assert verify_password(stored, PASSWORD) is True
    assert verify_password(stored, PASSWORD.encode()) is True
    assert verify_password(stored, WRONG) is False
    assert verify_password(stored, "") is False


@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "PLAIN"])
async def test_async_verify(scheme):
    assert await verify_password_async(STORED[scheme], PASSWORD) is True
    assert await verify_password_async(STORED[scheme], WRONG) is False


def test_non_ascii_passwords_are_utf8():
    stored = {
        "{PLAIN}" + UNICODE,
        "{ARGON2ID}" + argon2.PasswordHasher(time_cost=1, memory_cost=8192).hash(UNICODE),
        "{BLF-CRYPT}" + bcrypt.hashpw(UNICODE.encode(), bcrypt.gensalt(4)).decode(),
        "{SHA512-CRYPT}" + openssl_crypt("-6", UNICODE),
        "{SSHA256}" + ssha("sha256", UNICODE),
    }
    for value in stored:
        assert verify_password(value, UNICODE) is True, value
        assert verify_password(value, UNICODE.encode("utf-8")) is True, value
        assert verify_password(value, "passwoerd ✓") is False, value


def test_bcrypt_uses_the_first_72_bytes_like_dovecot():
    long = "x" * 72 + "tail"
    stored = "{BLF-CRYPT}" + bcrypt.hashpw(long[:72].encode(), bcrypt.gensalt(4)).decode()
    assert verify_password(stored, long) is True
    assert verify_password(stored, long[:72]) is True
    assert verify_password(stored, long[:71]) is False


def test_crypt_forms_without_prefix():
    for scheme in ("ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT"):
        bare = split_scheme(STORED[scheme])[1]
        assert split_scheme(bare)[0] == scheme
        assert verify_password(bare, PASSWORD) is True
        assert verify_password(bare, WRONG) is False


def test_no_prefix_is_default_scheme():
    assert split_scheme("secret") == ("PLAIN", "secret")
    assert verify_password("secret", "secret") is True
    assert verify_password("secret", "secreT") is False
    assert verify_password(ssha("sha256", "pw"), "pw", default_scheme="SSHA256") is True
    # an unterminated brace is not a scheme
    assert split_scheme("{PLAIN") == ("PLAIN", "{PLAIN")


def test_plain_uses_constant_time_compare(monkeypatch):
    import slimta.lookup.credentials as mod

    calls = []
    real = mod.hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(mod.hmac, "compare_digest", spy)
    assert verify_password("{PLAIN}abc", "abc") is True
    assert calls == [(b"abc", b"abc")]


def test_unknown_scheme_raises():
    with pytest.raises(UnknownSchemeError, match=r"\{NOPE\}"):
        verify_password("{NOPE}x", "x")


def test_malformed_hashes_never_match(caplog):
    caplog.set_level(logging.WARNING)
    assert verify_password("{SHA512-CRYPT}$6$bad", "x") is False
    assert verify_password("{BLF-CRYPT}$2y$04$short", "x") is False
    assert verify_password("{ARGON2ID}$argon2id$v=19$garbage", "x") is False
    assert verify_password("{SSHA}!!!notbase64", "x") is False
    assert verify_password("{SHA256}" + base64.b64encode(b"short").decode(), "x") is False
    assert verify_password("{SSHA512.HEX}zz", "x") is False
    assert "malformed" in caplog.text or "not valid" in caplog.text


# --- LookupCredentials ------------------------------------------------------------

USERS = {
    "alice@example.com": {"password": STORED["ARGON2ID"], "name": "Alice"},
    "bob@example.com": {"password": STORED["BLF-CRYPT"]},
    "carol@example.com": {"password": STORED["SHA512-CRYPT"]},
    "dave@example.com": {"password": STORED["PLAIN"]},
    "eve@example.com": {"password": "{NOPE}x"},
    "nopass@example.com": {"quota": 1},
}


class FailingLookup(DictLookup):
    async def lookup(self, **kwargs):
        raise LookupError("backend down")


def plain(user, password, authzid=None):
    return Credentials("PLAIN", user, authzid, secret=password)


def cram(user, password, challenge="<1.2@host>"):
    import hmac

    digest = hmac.new(password.encode(), challenge.encode(), "md5").hexdigest()
    return Credentials("CRAM-MD5", user, challenge=challenge, digest=digest)


@pytest.fixture
def checker():
    return LookupCredentials(DictLookup(USERS, "{username}"))


@pytest.mark.parametrize("user", ["alice", "bob", "carol", "dave"])
async def test_lookup_credentials_accepts_right_password(checker, user):
    reply = Reply("235", "2.7.0 Authentication successful")
    record = await checker.handle_auth(reply, plain(f"{user}@example.com", PASSWORD))
    assert record is not None and "password" in record
    assert (reply.code, reply.message) == ("235", "2.7.0 Authentication successful")


@pytest.mark.parametrize("creds", [
    plain("alice@example.com", WRONG),
    plain("bob@example.com", WRONG),
    plain("carol@example.com", WRONG),
    plain("dave@example.com", WRONG),
    plain("nobody@example.com", PASSWORD),
    plain("nopass@example.com", PASSWORD),
    plain("eve@example.com", "x"),
    plain("dave@example.com", PASSWORD, authzid="alice@example.com"),
    cram("alice@example.com", PASSWORD),  # a hash cannot answer CRAM-MD5
    cram("dave@example.com", WRONG),
], ids=["argon2", "bcrypt", "sha512", "plain", "unknown-user", "no-password",
        "unknown-scheme", "authzid", "cram-vs-hash", "cram-wrong"])
async def test_lookup_credentials_rejects_with_535(checker, creds):
    reply = Reply("235", "2.7.0 Authentication successful")
    assert await checker.handle_auth(reply, creds) is None
    assert (reply.code, reply.message) == ("535", "5.7.8 Authentication credentials invalid")


async def test_lookup_credentials_cram_md5_with_plain_secret(checker):
    assert await checker.check(cram("dave@example.com", PASSWORD)) == USERS["dave@example.com"]


async def test_lookup_credentials_authzid_allowed_and_same():
    checker = LookupCredentials(DictLookup(USERS, "{username}"), allow_authzid=True)
    assert await checker.check(plain("dave@example.com", PASSWORD, "alice@example.com"))
    strict = LookupCredentials(DictLookup(USERS, "{username}"))
    assert await strict.check(plain("dave@example.com", PASSWORD, "dave@example.com"))


async def test_lookup_credentials_address_kwargs_and_field():
    lookup = DictLookup({"example.com/dave": {"pw": "{PLAIN}s"}}, "{domain}/{localpart}")
    checker = LookupCredentials(lookup, password_field="pw")
    assert await checker.check(plain("dave@example.com", "s")) == {"pw": "{PLAIN}s"}
    assert await checker.check(plain("dave@example.com", "t")) is None


async def test_lookup_credentials_dummy_password_for_unknown_users(monkeypatch):
    import slimta.lookup.credentials as mod

    checked = []
    real = mod.verify_password

    def spy(stored, given, default_scheme="PLAIN"):
        checked.append((stored, given))
        return real(stored, given, default_scheme)

    monkeypatch.setattr(mod, "verify_password", spy)
    checker = LookupCredentials(DictLookup(USERS, "{username}"),
                                dummy_password=STORED["BLF-CRYPT"])
    # even the dummy's own password does not let an unknown user in
    assert await checker.check(plain("nobody@example.com", PASSWORD)) is None
    assert checked == [(STORED["BLF-CRYPT"], PASSWORD)]


async def test_lookup_credentials_lookup_failure_is_454():
    checker = LookupCredentials(FailingLookup({}, "{username}"))
    reply = Reply("235", "2.7.0 Authentication successful")
    assert await checker.handle_auth(reply, plain("dave@example.com", PASSWORD)) is None
    assert (reply.code, reply.message) == ("454", "4.7.0 Temporary authentication failure")


# --- SMTP AUTH end to end ---------------------------------------------------------


class AuthValidators(SmtpValidators):
    checker = LookupCredentials(DictLookup(USERS, "{username}"))

    async def handle_auth(self, reply, creds):
        await self.checker.handle_auth(reply, creds)


@pytest.fixture
def edge(run_edge):
    return run_edge(validator_class=AuthValidators, auth=True, auth_require_tls=False)


def connect(edge) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


@pytest.mark.parametrize("mech,user", [
    ("PLAIN", "alice@example.com"), ("LOGIN", "bob@example.com"),
    ("PLAIN", "carol@example.com"), ("CRAM-MD5", "dave@example.com"),
])
def test_smtp_auth_accepts_right_password(edge, mech, user):
    client = connect(edge)
    try:
        client.user, client.password = user, PASSWORD
        method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login,
                  "CRAM-MD5": client.auth_cram_md5}[mech]
        code, _ = client.auth(mech, method)
        assert code == 235
        client.sendmail("sender@example.com", ["rcpt@example.org"], b"Subject: x\r\n\r\nhi\r\n")
    finally:
        client.quit()
    env = edge.queue.envelopes[-1]
    assert env.client["auth"] == user
    assert env.client["protocol"] == "ESMTPA"


@pytest.mark.parametrize("mech,user,password", [
    ("PLAIN", "alice@example.com", WRONG), ("LOGIN", "carol@example.com", WRONG),
    ("PLAIN", "nobody@example.com", PASSWORD), ("CRAM-MD5", "alice@example.com", PASSWORD),
    ("CRAM-MD5", "dave@example.com", WRONG),
])
def test_smtp_auth_rejects_wrong_password_with_535(edge, mech, user, password):
    client = connect(edge)
    try:
        client.user, client.password = user, password
        method = {"PLAIN": client.auth_plain, "LOGIN": client.auth_login,
                  "CRAM-MD5": client.auth_cram_md5}[mech]
        with pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.auth(mech, method)
        assert info.value.smtp_code == 535
        assert info.value.smtp_error == b"5.7.8 Authentication credentials invalid"
        # still unauthenticated: the session goes on without AUTH
        assert client.mail("sender@example.com")[0] == 250
    finally:
        client.quit()
