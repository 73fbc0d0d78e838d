"""Tests for slimta.smtp.auth: the server side of PLAIN, LOGIN and CRAM-MD5."""

from __future__ import annotations

import base64
import hmac

import pytest
from smtphelp import HOST, NONCE, b64

from slimta.smtp.auth import (
    PLAINTEXT_MECHANISMS,
    SERVER_MECHANISMS,
    AuthExchange,
    Cancelled,
    Challenge,
    Credentials,
    Done,
    Malformed,
)


def unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8")


def exchange(mech: str, initial: str | None = None) -> AuthExchange:
    return AuthExchange(mech, initial, HOST, NONCE)


def test_constants():
    assert SERVER_MECHANISMS == ("PLAIN", "LOGIN", "CRAM-MD5")
    assert frozenset({"PLAIN", "LOGIN"}) == PLAINTEXT_MECHANISMS


def test_unknown_mechanism():
    with pytest.raises(ValueError):
        exchange("GSSAPI")


# --- PLAIN ----------------------------------------------------------------


def test_plain_initial_response():
    ex = exchange("plain", b64("\0alice\0s3cret"))
    step = ex.step(None)
    assert isinstance(step, Done) and step.kind == "done"
    creds = step.credentials
    assert (creds.mechanism, creds.authcid, creds.authzid) == ("PLAIN", "alice", None)
    assert creds.check_secret("s3cret")
    assert not creds.check_secret("s3creT")
    assert creds.has_secret and creds.secret == "s3cret"
    assert ex.finished


def test_plain_with_authzid_and_utf8():
    step = exchange("PLAIN", b64("bob\0alice\0pässwörd")).step(None)
    creds = step.credentials
    assert (creds.authcid, creds.authzid) == ("alice", "bob")
    assert creds.check_secret("pässwörd")
    assert creds.check_secret("pässwörd".encode())


def test_plain_empty_challenge():
    ex = exchange("PLAIN")
    step = ex.step(None)
    assert step == Challenge("")
    assert step.kind == "challenge"
    assert step.encoded == ""
    step = ex.step(b64("\0alice\0pw"))
    assert isinstance(step, Done)
    assert step.credentials.check_secret("pw")


def test_plain_equals_initial_response_means_empty():
    # '=' is an empty initial response: an empty PLAIN message is malformed.
    step = exchange("PLAIN", "=").step(None)
    assert isinstance(step, Malformed)


@pytest.mark.parametrize(
    "raw",
    [b"alice\0pw", b"\0alice\0pw\0", b"\0\0pw", b"\0alice\0", b"", b"\0al\xffice\0pw"],
)
def test_plain_malformed(raw):
    step = exchange("PLAIN", b64(raw)).step(None)
    assert isinstance(step, Malformed) and step.kind == "malformed"
    ex = exchange("PLAIN")
    ex.step(None)
    assert isinstance(ex.step(b64(raw)), Malformed)


# --- LOGIN ----------------------------------------------------------------


def test_login_full_exchange():
    ex = exchange("LOGIN")
    step = ex.step(None)
    assert isinstance(step, Challenge)
    assert step.text == "Username:"
    assert unb64(step.encoded) == "Username:"
    assert step.encoded == "VXNlcm5hbWU6"
    step = ex.step(b64("alice"))
    assert step == Challenge("Password:")
    assert step.encoded == "UGFzc3dvcmQ6"
    step = ex.step(b64("pw"))
    assert isinstance(step, Done)
    creds = step.credentials
    assert (creds.mechanism, creds.authcid, creds.authzid) == ("LOGIN", "alice", None)
    assert creds.check_secret("pw") and not creds.check_secret("pw ")


def test_login_initial_response_is_the_user_name():
    ex = exchange("login", b64("alice"))
    assert ex.step(None) == Challenge("Password:")
    step = ex.step(b64("pw") + "  ")  # trailing space tolerated
    assert step.credentials.authcid == "alice"
    assert step.credentials.check_secret("pw")


@pytest.mark.parametrize("bad", ["", "=", b64(b"\xff\xfe"), b64("a\0b")])
def test_login_malformed_username(bad):
    ex = exchange("LOGIN")
    ex.step(None)
    assert isinstance(ex.step(bad), Malformed)


def test_login_empty_password():
    ex = exchange("LOGIN", b64("alice"))
    ex.step(None)
    assert isinstance(ex.step(""), Malformed)


# --- CRAM-MD5 -------------------------------------------------------------


def cram_digest(secret: str, challenge: str) -> str:
    return hmac.new(secret.encode(), challenge.encode(), "md5").hexdigest()


def test_cram_md5_full_exchange():
    ex = exchange("CRAM-MD5")
    step = ex.step(None)
    assert isinstance(step, Challenge)
    assert step.text == f"<{NONCE}@{HOST}>"
    challenge = unb64(step.encoded)
    assert challenge == step.text
    step = ex.step(b64(f"alice {cram_digest('tanstaaftanstaaf', challenge)}"))
    assert isinstance(step, Done)
    creds = step.credentials
    assert (creds.mechanism, creds.authcid, creds.authzid) == ("CRAM-MD5", "alice", None)
    assert creds.check_secret("tanstaaftanstaaf") is True
    assert creds.check_secret("tanstaaftanstaaF") is False
    assert creds.check_secret("") is False
    assert not creds.has_secret
    with pytest.raises(AttributeError):
        _ = creds.secret


def test_cram_md5_rfc2195_example():
    # The example of RFC 2195 §2.
    creds = Credentials(
        "CRAM-MD5", "tim",
        challenge="<1896.697170952@postoffice.reston.mci.net>",
        digest="b913a602c7eda7a495b4e6e7334d3890",
    )
    assert creds.check_secret("tanstaaftanstaaf")
    assert not creds.check_secret("tanstaaf")


def test_cram_md5_user_with_space_and_upper_case_digest():
    ex = exchange("CRAM-MD5")
    challenge = ex.step(None).text
    digest = cram_digest("pw", challenge).upper()
    step = ex.step(b64(f"John Smith {digest}"))
    assert step.credentials.authcid == "John Smith"
    assert step.credentials.check_secret("pw")


@pytest.mark.parametrize(
    "response",
    ["alice", "alice " + "0" * 31, "alice " + "g" * 32, " " + "0" * 32, "alice\t" + "0" * 32, ""],
)
def test_cram_md5_malformed(response):
    ex = exchange("CRAM-MD5")
    ex.step(None)
    assert isinstance(ex.step(b64(response)), Malformed)


def test_cram_md5_refuses_initial_response():
    assert isinstance(exchange("CRAM-MD5", b64("alice")).step(None), Malformed)


# --- cancel, bad base64, misuse ---------------------------------------------


@pytest.mark.parametrize("mech", SERVER_MECHANISMS)
def test_cancel(mech):
    ex = exchange(mech)
    assert isinstance(ex.step(None), Challenge)
    step = ex.step("*")
    assert isinstance(step, Cancelled) and step.kind == "cancelled"
    assert step == Cancelled()
    assert ex.finished
    with pytest.raises(RuntimeError):
        ex.step(b64("x"))


def test_cancel_in_the_middle_of_login():
    ex = exchange("LOGIN")
    ex.step(None)
    ex.step(b64("alice"))
    assert isinstance(ex.step("*"), Cancelled)


def test_cancel_as_initial_response():
    assert isinstance(exchange("PLAIN", "*").step(None), Cancelled)


@pytest.mark.parametrize("bad", ["not base64!", "AAA", "A===", "QUJD\x00", "ä"])
@pytest.mark.parametrize("mech", SERVER_MECHANISMS)
def test_bad_base64(mech, bad):
    ex = exchange(mech)
    ex.step(None)
    step = ex.step(bad)
    assert isinstance(step, Malformed)
    assert "base64" in step.reason
    with pytest.raises(RuntimeError):
        ex.step("")


def test_bad_base64_initial_response():
    step = exchange("PLAIN", "%%%").step(None)
    assert isinstance(step, Malformed)


def test_step_misuse():
    ex = exchange("LOGIN")
    with pytest.raises(RuntimeError):
        ex.step("abc")  # the first call takes None
    ex = exchange("LOGIN")
    ex.step(None)
    with pytest.raises(RuntimeError):
        ex.step(None)
    ex = exchange("PLAIN", b64("\0a\0b"))
    ex.step(None)
    with pytest.raises(RuntimeError):
        ex.step(None)


# --- secrets stay secret ------------------------------------------------------


def test_repr_does_not_leak_secrets():
    step = exchange("PLAIN", b64("zid\0alice\0hunter2")).step(None)
    creds = step.credentials
    for text in (repr(creds), str(creds), repr(step)):
        assert "hunter2" not in text
        assert "alice" in text
    ex = exchange("CRAM-MD5")
    challenge = ex.step(None).text
    digest = cram_digest("hunter2", challenge)
    step = ex.step(b64(f"alice {digest}"))
    for text in (repr(step.credentials), str(step.credentials), repr(step), repr(ex)):
        assert digest not in text
    ex = exchange("PLAIN", b64("\0alice\0hunter2"))
    assert "aHVudGVyMg" not in repr(ex)  # base64 of the password
    assert not hasattr(step.credentials, "__dict__")


def test_exchange_forgets_the_initial_response():
    initial = b64("\0alice\0hunter2")
    ex = exchange("PLAIN", initial)
    ex.step(None)
    assert all(getattr(ex, name, None) != initial for name in AuthExchange.__slots__)


def test_credentials_need_something_to_check():
    with pytest.raises(ValueError):
        Credentials("PLAIN", "alice")
    assert Credentials("login", "a", "", secret="x").authzid is None
