"""Tests for slimta.relay.maildir: MaildirRelay with a fixed path and with path templates."""

from __future__ import annotations

import asyncio
import errno
import os
import re

import pytest

from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.maildir import MaildirRelay, header_newline, split_address, trace_headers

DATA = b"From: alice@example.com\r\nSubject: hi\r\n\r\nbody \xc3\xa9\r\n.\r\n"
# time.MusecPpidQcounterRrandom.host (cr.yp.to/proto/maildir.html)
NAME_RE = re.compile(r"^\d+\.M\d+P\d+Q\d+R[0-9a-f]{8}\.[^/:]+$")


def envelope(*rcpts: str, sender: str = "alice@example.com", data: bytes = DATA) -> Envelope:
    env = Envelope(sender, list(rcpts or ["bob@example.net"]))
    env.parse(data)
    return env


def delivered(maildir) -> list[bytes]:
    """The messages in ``maildir``/new, oldest name first; tmp/ must be empty."""
    assert os.listdir(os.path.join(maildir, "tmp")) == []
    assert os.path.isdir(os.path.join(maildir, "cur"))
    new = os.path.join(maildir, "new")
    out = []
    for name in sorted(os.listdir(new)):
        assert NAME_RE.match(name), name
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


def tree(root) -> list[str]:
    """Every directory under ``root``, relative to it."""
    return sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root))


# --- one Maildir ------------------------------------------------------------------------


async def test_fixed_path_delivers_each_message_once(tmp_path):
    maildir = tmp_path / "Maildir"
    relay = MaildirRelay(str(maildir))
    assert relay.path == str(maildir)
    env = envelope("bob@example.net", "carol@example.net")
    assert await relay.attempt(env, 0) is None
    assert await relay.attempt(envelope(sender=""), 0) is None
    assert delivered(maildir) == [
        b"Return-Path: <alice@example.com>\r\n" + DATA,
        b"Return-Path: <>\r\n" + DATA,
    ]


async def test_fixed_path_is_created_with_its_parents(tmp_path):
    maildir = tmp_path / "a" / "b" / "Maildir"
    await MaildirRelay(str(maildir), fsync=False).attempt(envelope(), 0)
    assert len(delivered(maildir)) == 1


async def test_header_lines_follow_the_message_line_endings(tmp_path):
    lf = b"Subject: unix\n\nbody\n"
    await MaildirRelay(str(tmp_path / "lf")).attempt(envelope(data=lf), 0)
    assert delivered(tmp_path / "lf") == [b"Return-Path: <alice@example.com>\n" + lf]
    await MaildirRelay(str(tmp_path / "nohead")).attempt(envelope(data=b"just a body\r\n"), 0)
    assert delivered(tmp_path / "nohead") == [
        b"Return-Path: <alice@example.com>\r\n\r\njust a body\r\n"]


def test_trace_headers_cannot_be_used_to_inject_fields():
    head = b"Subject: x\r\n\r\n"
    assert trace_headers(head, "evil@x\r\nBcc: all@y", "r@x\n") == (
        b"Return-Path: <evil@xBcc: all@y>\r\nDelivered-To: r@x\r\n")
    assert trace_headers(head, "a@x", "r@x", return_path=False) == b"Delivered-To: r@x\r\n"
    assert header_newline(b"") == b"\r\n"
    assert header_newline(b"\n") == b"\n"
    assert split_address("Bob.Smith@Example.NET") == ("Bob.Smith", "example.net")
    assert split_address('"a@b"@Example.net') == ('"a@b"', "example.net")
    assert split_address("postmaster") == ("postmaster", "")


# --- path templates ---------------------------------------------------------------------


async def test_template_delivers_per_recipient_with_delivered_to(tmp_path):
    relay = MaildirRelay(str(tmp_path / "{domain}" / "{localpart}"))
    env = envelope("Bob@Example.NET", "carol@example.net", "dave@other.test", "Bob@Example.NET")
    result = await relay.attempt(env, 0)
    assert result == {"Bob@Example.NET": None, "carol@example.net": None,
                      "dave@other.test": None}
    assert delivered(tmp_path / "example.net" / "Bob") == [
        b"Return-Path: <alice@example.com>\r\nDelivered-To: Bob@Example.NET\r\n" + DATA]
    assert delivered(tmp_path / "example.net" / "carol") == [
        b"Return-Path: <alice@example.com>\r\nDelivered-To: carol@example.net\r\n" + DATA]
    assert len(delivered(tmp_path / "other.test" / "dave")) == 1


async def test_recipient_macro_lower_cases_the_domain_only(tmp_path):
    relay = MaildirRelay(str(tmp_path / "mail" / "{recipient}" / "Maildir"))
    result = await relay.attempt(envelope("Bob@Example.NET"), 0)
    assert result == {"Bob@Example.NET": None}
    assert len(delivered(tmp_path / "mail" / "Bob@example.net" / "Maildir")) == 1


async def test_recipients_sharing_a_maildir_get_a_copy_each(tmp_path):
    relay = MaildirRelay(str(tmp_path / "{domain}"))
    result = await relay.attempt(envelope("a@example.net", "b@example.net"), 0)
    assert result == {"a@example.net": None, "b@example.net": None}
    copies = delivered(tmp_path / "example.net")
    assert sorted(c.split(b"\r\n")[1] for c in copies) == [
        b"Delivered-To: a@example.net", b"Delivered-To: b@example.net"]


@pytest.mark.parametrize(
    "rcpt",
    [
        "../../etc@example.net",
        "..@example.net",
        ".hidden@example.net",
        "a/b@example.net",
        "a@../x",
        "a@x/y",
        "a@.x",
        "@example.net",
        "tab\there@example.net",
        "postmaster",  # no domain for {domain}
    ],
)
async def test_unsafe_recipients_are_refused_and_nothing_is_created(tmp_path, rcpt):
    root = tmp_path / "root"
    root.mkdir()
    relay = MaildirRelay(str(root / "{domain}" / "{localpart}"))
    result = await relay.attempt(envelope(rcpt, "ok@example.net"), 0)
    assert result["ok@example.net"] is None
    error = result[rcpt]
    assert isinstance(error, PermanentRelayError)
    assert error.reply == ("550", "5.1.3 Bad destination mailbox address syntax")
    assert tree(tmp_path) == [".", "root", "root/example.net", "root/example.net/ok",
                              "root/example.net/ok/cur", "root/example.net/ok/new",
                              "root/example.net/ok/tmp"]


async def test_recipient_without_domain_is_fine_when_only_the_localpart_is_used(tmp_path):
    relay = MaildirRelay(str(tmp_path / "{localpart}"))
    assert await relay.attempt(envelope("postmaster"), 0) == {"postmaster": None}
    assert len(delivered(tmp_path / "postmaster")) == 1


def test_template_errors():
    with pytest.raises(ValueError, match="unknown macro"):
        MaildirRelay("/var/mail/{user}")
    with pytest.raises(ValueError, match="unknown macro"):
        MaildirRelay("/var/mail/{domain!r}")
    with pytest.raises(ValueError, match="bad template"):
        MaildirRelay("/var/mail/{domain")
    assert MaildirRelay("/var/mail/{{literal}}").macros == frozenset()


async def test_literal_braces_in_a_fixed_path(tmp_path):
    relay = MaildirRelay(str(tmp_path / "{{x}}"))
    assert await relay.attempt(envelope(), 0) is None
    assert len(delivered(tmp_path / "{x}")) == 1


# --- durability -------------------------------------------------------------------------


@pytest.fixture
def fsyncs(monkeypatch):
    """Records what each os.fsync call synced (a path, from /proc/self/fd)."""
    synced: list[str] = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return synced


async def test_file_then_new_directory_are_fsynced(tmp_path, fsyncs):
    maildir = tmp_path / "Maildir"
    (maildir / "new").mkdir(parents=True)  # an existing Maildir: no parent syncs
    relay = MaildirRelay(str(maildir))
    await relay.attempt(envelope(), 0)
    [name] = os.listdir(maildir / "new")
    assert fsyncs == [str(maildir / "tmp" / name), str(maildir / "new")]


async def test_a_new_maildir_has_its_directory_entries_fsynced(tmp_path, fsyncs):
    relay = MaildirRelay(str(tmp_path / "{localpart}"))
    await relay.attempt(envelope("bob@example.net"), 0)
    bob = tmp_path / "bob"
    [name] = os.listdir(bob / "new")
    assert fsyncs == [str(bob), str(tmp_path), str(bob / "tmp" / name), str(bob / "new")]
    fsyncs.clear()
    await relay.attempt(envelope("bob@example.net"), 0)
    assert len(fsyncs) == 2  # the Maildir is known now


async def test_fsync_false_skips_them(tmp_path, fsyncs):
    await MaildirRelay(str(tmp_path / "M"), fsync=False).attempt(envelope(), 0)
    assert fsyncs == []
    assert len(delivered(tmp_path / "M")) == 1


async def test_unique_names_under_concurrency(tmp_path):
    maildir = tmp_path / "Maildir"
    relays = [MaildirRelay(str(maildir), fsync=False), MaildirRelay(str(maildir), fsync=False)]
    envs = [envelope(data=b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(300)]
    results = await asyncio.gather(
        *(relays[i % 2].attempt(env, 0) for i, env in enumerate(envs)))
    assert results == [None] * 300
    messages = delivered(maildir)
    assert len(messages) == 300
    assert sorted(m.split(b"\r\n")[1] for m in messages) == sorted(
        b"Subject: %d" % i for i in range(300))


# --- failures ---------------------------------------------------------------------------


async def test_unwritable_maildir_is_transient(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TransientRelayError) as info:
        await MaildirRelay(str(blocker)).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.3.0 Could not write to the mailbox")
    relay = MaildirRelay(str(tmp_path / "{localpart}"))
    (tmp_path / "bob").write_text("in the way")
    result = await relay.attempt(envelope("bob@example.net", "carol@example.net"), 0)
    assert isinstance(result["bob@example.net"], TransientRelayError)
    assert result["carol@example.net"] is None


@pytest.mark.parametrize(
    ("err", "reply"),
    [
        (errno.ENOSPC, ("452", "4.3.1 Insufficient system storage")),
        (errno.EDQUOT, ("452", "4.2.2 Mailbox full")),
        (errno.EIO, ("451", "4.3.0 Could not write to the mailbox")),
    ],
)
async def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch, err, reply):
    def broken(fd):
        raise OSError(err, os.strerror(err))

    maildir = tmp_path / "Maildir"
    relay = MaildirRelay(str(maildir))
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert info.value.reply == reply
    assert os.listdir(maildir / "tmp") == []
    assert os.listdir(maildir / "new") == []


async def test_a_maildir_removed_behind_our_back_is_made_again(tmp_path):
    import shutil

    maildir = tmp_path / "Maildir"
    relay = MaildirRelay(str(maildir))
    await relay.attempt(envelope(), 0)
    shutil.rmtree(maildir)
    with pytest.raises(TransientRelayError):
        await relay.attempt(envelope(), 0)  # it was known to exist
    assert await relay.attempt(envelope(), 0) is None  # the retry creates it again
    assert len(delivered(maildir)) == 1
