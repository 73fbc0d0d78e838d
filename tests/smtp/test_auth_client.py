"""Tests for the client side of slimta.smtp.auth: ClientAuth (PLAIN, LOGIN, CRAM-MD5, XOAUTH2).

The first three are checked against the server side (AuthExchange) of the
same module; XOAUTH2, which the server does not implement, against the
exchange Google documents.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelp import HOST, NONCE, b64

from slimta.smtp.auth import (
    CLIENT_MECHANISMS,
    SERVER_MECHANISMS,
    AuthExchange,
    Challenge,
    ClientAuth,
    Done,
)


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def run(client: ClientAuth, hostname: str = HOST, nonce: str = NONCE):
    """Drive ``client`` against the server's AuthExchange; the server's last step."""
    server = AuthExchange(client.mechanism, client.initial_response, hostname, nonce)
    step = server.step(None)
    rounds = 0
    while isinstance(step, Challenge):
        rounds += 1
        assert rounds < 5
        step = server.step(client.respond(step.encoded))
    return step


def test_constants():
    assert CLIENT_MECHANISMS == ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2")
    assert set(SERVER_MECHANISMS) <= set(CLIENT_MECHANISMS)


# --- PLAIN -----------------------------------------------------------------

def test_plain_sends_an_initial_response():
    auth = ClientAuth("plain", "tim", "tanstaaftanstaaf")
    assert auth.mechanism == "PLAIN"
    assert unb64(auth.initial_response) == b"\x00tim\x00tanstaaftanstaaf"
    assert auth.command() == "AUTH PLAIN " + auth.initial_response


def test_plain_with_authzid():
    auth = ClientAuth("PLAIN", "tim", "secret", authzid="boss")
    assert unb64(auth.initial_response) == b"boss\x00tim\x00secret"
    step = run(auth)
    assert isinstance(step, Done)
    creds = step.credentials
    assert (creds.authcid, creds.authzid) == ("tim", "boss")
    assert creds.check_secret("secret")


def test_plain_has_nothing_more_to_say():
    # a server that asks for more after the initial response gets a cancel
    auth = ClientAuth("PLAIN", "tim", "secret")
    assert auth.respond("") == "*"
    assert auth.finished
    assert auth.respond("") == "*"


# --- LOGIN -----------------------------------------------------------------

def test_login_answers_in_order():
    auth = ClientAuth("LOGIN", "tim", "secret")
    assert auth.initial_response is None
    assert auth.command() == "AUTH LOGIN"
    assert unb64(auth.respond(b64("Username:"))) == b"tim"
    assert unb64(auth.respond(b64("Password:"))) == b"secret"
    assert auth.respond(b64("More?")) == "*"


def test_login_relies_on_order_not_on_challenge_text():
    auth = ClientAuth("LOGIN", "tim", "secret")
    assert unb64(auth.respond(b64("User Name\x00"))) == b"tim"
    assert unb64(auth.respond("")) == b"secret"


# --- CRAM-MD5 ---------------------------------------------------------------

def test_cram_md5_rfc2195_example():
    # RFC 2195 §2
    auth = ClientAuth("CRAM-MD5", "tim", "tanstaaftanstaaf")
    assert auth.command() == "AUTH CRAM-MD5"
    challenge = b64("<1896.697170952@postoffice.reston.mci.net>")
    response = auth.respond(challenge)
    assert unb64(response) == b"tim b913a602c7eda7a495b4e6e7334d3890"
    assert response == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"


def test_cram_md5_against_the_server():
    step = run(ClientAuth("CRAM-MD5", "tim", "tanstaaftanstaaf"),
               "postoffice.reston.mci.net")
    assert isinstance(step, Done)
    assert step.credentials.check_secret("tanstaaftanstaaf")
    assert not step.credentials.check_secret("wrong")


# --- XOAUTH2 ---------------------------------------------------------------

GOOGLE_EXAMPLE = (
    "user=someuser@example.com\x01auth=Bearer ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg\x01\x01"
)


def test_xoauth2_initial_response_is_the_documented_one():
    auth = ClientAuth("xoauth2", "someuser@example.com",
                      "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg")
    assert auth.initial_response == b64(GOOGLE_EXAMPLE)
    assert auth.initial_response.startswith("dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5")
    assert auth.command() == "AUTH XOAUTH2 " + b64(GOOGLE_EXAMPLE)


def test_xoauth2_answers_the_error_challenge_with_an_empty_line():
    auth = ClientAuth("XOAUTH2", "someuser@example.com", "expired-token")
    error = b64('{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}')
    assert auth.respond(error) == ""
    assert not auth.finished
    assert auth.respond(error) == "*"
    assert auth.finished


# --- all mechanisms -----------------------------------------------------------

@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"])
def test_bad_base64_challenge_cancels(mech):
    auth = ClientAuth(mech, "tim", "secret")
    assert auth.respond("not base64!") == "*"
    assert auth.finished


@pytest.mark.parametrize("mech", SERVER_MECHANISMS)
def test_wrong_secret_is_told_apart_by_the_server(mech):
    step = run(ClientAuth(mech, "tim", "guess"))
    assert isinstance(step, Done)
    assert not step.credentials.check_secret("secret")
    assert step.credentials.check_secret("guess")


@pytest.mark.parametrize("mech", SERVER_MECHANISMS)
def test_bytes_and_utf8_secrets(mech):
    step = run(ClientAuth(mech, "jürgen", "pässwörd".encode()))
    assert isinstance(step, Done)
    assert step.credentials.authcid == "jürgen"
    assert step.credentials.check_secret("pässwörd")


_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n"),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(mech=st.sampled_from(SERVER_MECHANISMS), user=_TEXT, secret=_TEXT,
       authzid=st.one_of(st.none(), _TEXT))
def test_round_trip_with_the_server(mech, user, secret, authzid):
    if mech != "PLAIN":
        authzid = None
    step = run(ClientAuth(mech, user, secret, authzid))
    assert isinstance(step, Done), step
    creds = step.credentials
    assert creds.authcid == user
    assert creds.authzid == (authzid or None)
    assert creds.check_secret(secret)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        (("GSSAPI", "tim", "secret"), {}),
        (("LOGIN", "tim", "secret"), {"authzid": "boss"}),
        (("CRAM-MD5", "tim", "secret"), {"authzid": "boss"}),
        (("XOAUTH2", "tim", "token"), {"authzid": "boss"}),
        (("PLAIN", "", "secret"), {}),
        (("PLAIN", "tim", "sec\x00ret"), {}),
        (("PLAIN", "t\x00im", "secret"), {}),
        (("PLAIN", "tim", "secret"), {"authzid": "bo\x00ss"}),
        (("LOGIN", "tim", "secret\r\nQUIT"), {}),
        (("XOAUTH2", "tim", "tok\x01en"), {}),
        (("XOAUTH2", "t\x01im", "token"), {}),
    ],
)
def test_refused_credentials(args, kwargs):
    with pytest.raises(ValueError):
        ClientAuth(*args, **kwargs)


def test_repr_hides_the_secret():
    auth = ClientAuth("PLAIN", "tim", "topsecret")
    assert "topsecret" not in repr(auth)
    assert b64("\x00tim\x00topsecret") not in repr(auth)
    assert repr(auth) == "ClientAuth('PLAIN', finished=False)"

