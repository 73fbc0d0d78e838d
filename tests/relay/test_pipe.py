"""Tests for slimta.relay.pipe: PipeRelay, MaildropRelay and DovecotLdaRelay.

Every test runs real programs: small Python scripts written into tmp_path
that record their arguments, environment and standard input, then answer
with a chosen exit status and output. The last test delivers with Dovecot's
own dovecot-lda into a real Maildir.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import sys
import textwrap
import time

import pytest

from daemons import daemon_dir, dovecot_setup, start_dovecot, wait_gone
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.pipe import DovecotLdaRelay, MaildropRelay, PipeRelay

DATA = (
    b"From: Alice <alice@example.com>\r\n"
    b"Subject: pipe test\r\n"
    b"Message-Id: <m1.x@example.com>\r\n"
    b"\r\n"
    b"line one\r\n"
    b".\r\n"
    b"caf\xc3\xa9 \xff\x00 raw bytes\r\n"
)


def envelope(*rcpts: str, sender: str = "alice@example.com", data: bytes = DATA) -> Envelope:
    env = Envelope(sender, list(rcpts or ["bob@example.net"]))
    env.parse(data)
    env.client = {"ip": "192.0.2.1", "host": "mail.example.com", "name": "helo.example.com",
                  "protocol": "ESMTPSA", "auth": "alice"}
    env.receiver = "mx.example.org"
    return env


class FakeProgram:
    """An executable that logs each run (argv, stdin, env, pid) as a JSON line.

    ``code`` is Python run after the logging, with ``argv`` (the arguments
    after the program name), ``data`` (stdin) and the modules os, sys, time
    and signal at hand.
    """

    def __init__(self, directory, name: str, code: str = "sys.exit(0)", read_stdin: bool = True):
        self.path = str(directory / name)
        self.log = str(directory / f"{name}.log")
        read = "sys.stdin.buffer.read()" if read_stdin else "b''"
        source = (
            f"#!{sys.executable}\n"
            "import json, os, signal, sys, time\n"
            "argv = sys.argv[1:]\n"
            f"data = {read}\n"
            f"with open({self.log!r}, 'a') as f:\n"
            "    f.write(json.dumps({'argv': argv, 'stdin': data.hex(), 'pid': os.getpid(),\n"
            "                        'env': dict(os.environ)}) + '\\n')\n"
            + textwrap.dedent(code) + "\n"
        )
        with open(self.path, "w") as f:
            f.write(source)
        os.chmod(self.path, 0o755)

    @property
    def runs(self) -> list[dict]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            runs = [json.loads(line) for line in f]
        for run in runs:
            run["stdin"] = bytes.fromhex(run["stdin"])
        return runs


@pytest.fixture
def program(tmp_path):
    def make(code: str = "sys.exit(0)", name: str = "prog", **kwargs) -> FakeProgram:
        return FakeProgram(tmp_path, name, code, **kwargs)

    return make


# --- arguments and macros ----------------------------------------------------------


async def test_macros_expand_in_each_argument(program):
    prog = program()
    relay = PipeRelay([
        prog.path, "-f", "{sender}", "--id={message_id}", "{client_ip}", "{client_host}",
        "{client_name}", "{client_protocol}", "{client_auth}", "by={receiver}", "{{sender}}",
        "--", "{recipients}",
    ])
    env = envelope("bob@example.net", "Carol@Example.NET")
    assert await relay.attempt(env, 0) is None
    [run] = prog.runs
    assert run["argv"] == [
        "-f", "alice@example.com", "--id=m1.x@example.com", "192.0.2.1", "mail.example.com",
        "helo.example.com", "ESMTPSA", "alice", "by=mx.example.org", "{sender}",
        "--", "bob@example.net", "Carol@Example.NET",
    ]


async def test_unknown_values_and_the_null_sender_are_empty_arguments(program):
    prog = program()
    relay = PipeRelay([prog.path, "-f", "{sender}", "{message_id}", "{client_ip}",
                       "{client_auth}", "{receiver}"])
    env = Envelope("", ["bob@example.net"])
    env.parse(b"Subject: no id\r\n\r\nbody\r\n")
    await relay.attempt(env, 0)
    assert prog.runs[0]["argv"] == ["-f", "", "", "", "", ""]


async def test_an_address_is_one_argument_whatever_it_holds(program):
    prog = program()
    relay = PipeRelay([prog.path, "{sender}", "{recipients}"])
    env = envelope('"a b; rm -rf /"@example.net', sender="$(touch /tmp/x) `id`@example.com")
    await relay.attempt(env, 0)
    assert prog.runs[0]["argv"] == ["$(touch /tmp/x) `id`@example.com",
                                    '"a b; rm -rf /"@example.net']


async def test_folded_message_id_is_unfolded(program):
    prog = program()
    relay = PipeRelay([prog.path, "{message_id}"])
    env = envelope(data=b"Message-Id:\r\n <long.id@example.com>\r\n\r\nbody\r\n")
    await relay.attempt(env, 0)
    assert prog.runs[0]["argv"] == ["long.id@example.com"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        (["prog", "{recipient}"], {}, "need per_recipient"),
        (["prog", "{localpart}@{domain}"], {}, "need per_recipient"),
        (["prog", "{recipients}"], {"per_recipient": True}, "cannot be used with per_recipient"),
        (["prog", "--to={recipients}"], {}, "argument of its own"),
        (["prog", "{nope}"], {}, "unknown macro {nope}"),
        (["prog", "{sender!r}"], {}, "unknown macro"),
        (["prog", "{sender:>20}"], {}, "unknown macro"),
        (["prog", "{sender.__class__}"], {}, "unknown macro"),
        (["prog", "{sender"], {}, "bad template"),
        ([], {}, "must name a program"),
        (["prog"], {"delivered_to": True, "return_path": True}, "delivered_to needs"),
    ],
)
def test_bad_arguments_are_refused_at_construction(args, kwargs, error):
    with pytest.raises(ValueError, match=error.replace("{", r"\{")):
        PipeRelay(args, **kwargs)


def test_one_string_is_not_a_command_line():
    with pytest.raises(TypeError, match="no shell"):
        PipeRelay("/usr/bin/procmail -f {sender}")
    with pytest.raises(TypeError, match="must be strings"):
        PipeRelay(["prog", 3])


# --- what the program reads --------------------------------------------------------


async def test_stdin_is_the_message_byte_for_byte(program):
    prog = program()
    relay = PipeRelay([prog.path])
    await relay.attempt(envelope(), 0)
    assert prog.runs[0]["stdin"] == DATA


async def test_prepended_headers_are_written_and_a_large_message_arrives_whole(program):
    prog = program()
    big = DATA + b"x" * 998 + b"\r\n"
    big = big * 1200  # about 1.2 MB, much more than a pipe buffer
    env = envelope(data=big)
    env.prepend_header("Received", "from a by b; Thu, 1 Jan 2026 00:00:00 +0000")
    await PipeRelay([prog.path]).attempt(env, 0)
    assert prog.runs[0]["stdin"] == b"".join(env.flatten())
    assert prog.runs[0]["stdin"].startswith(b"Received: from a by b;")


async def test_return_path_delivered_to_and_unix_newlines(program):
    prog = program()
    relay = PipeRelay([prog.path, "{recipient}"], per_recipient=True, return_path=True,
                      delivered_to=True, unix_newlines=True)
    await relay.attempt(envelope("bob@example.net", "carol@example.net"), 0)
    runs = prog.runs
    assert [r["argv"] for r in runs] == [["bob@example.net"], ["carol@example.net"]]
    expected = DATA.replace(b"\r\n", b"\n")
    assert runs[0]["stdin"] == (b"Return-Path: <alice@example.com>\n"
                                b"Delivered-To: bob@example.net\n" + expected)
    assert runs[1]["stdin"] == (b"Return-Path: <alice@example.com>\n"
                                b"Delivered-To: carol@example.net\n" + expected)


async def test_return_path_of_the_null_sender_keeps_crlf(program):
    prog = program()
    env = envelope(sender="")
    await PipeRelay([prog.path], return_path=True).attempt(env, 0)
    assert prog.runs[0]["stdin"] == b"Return-Path: <>\r\n" + DATA


async def test_a_program_that_reads_nothing_still_reports_its_status(program):
    prog = program("sys.exit(0)", read_stdin=False)
    env = envelope(data=DATA + b"y" * 4_000_000)
    assert await PipeRelay([prog.path]).attempt(env, 0) is None
    prog = program("sys.exit(67)", name="nouser", read_stdin=False)
    with pytest.raises(PermanentRelayError):
        await PipeRelay([prog.path]).attempt(env, 0)


async def test_environment_is_given_or_inherited(program, monkeypatch):
    monkeypatch.setenv("SLIMTA_PIPE_TEST", "inherited")
    prog = program()
    await PipeRelay([prog.path]).attempt(envelope(), 0)
    await PipeRelay([prog.path], env={"ONLY": "this"}).attempt(envelope(), 0)
    first, second = prog.runs
    assert first["env"]["SLIMTA_PIPE_TEST"] == "inherited"
    assert second["env"]["ONLY"] == "this"
    assert "SLIMTA_PIPE_TEST" not in second["env"]
    assert "PATH" not in second["env"]


# --- exit statuses and output ------------------------------------------------------


async def test_exit_0_is_delivered(program):
    prog = program("print('5.1.1 ignored: the status says delivered'); sys.exit(0)")
    assert await PipeRelay([prog.path]).attempt(envelope(), 0) is None


async def test_exit_75_is_transient(program):
    prog = program("sys.exit(75)")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.3.0 prog: temporary failure")
    assert "prog exited with status 75" in str(info.value)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (1, "5.3.0 prog: unknown error"),
        (64, "5.3.0 prog: command line usage error"),
        (67, "5.1.1 prog: user unknown"),
        (73, "5.2.0 prog: can't create user output file"),
        (77, "5.7.0 prog: permission denied"),
        (78, "5.3.5 prog: local configuration error"),
    ],
)
async def test_other_statuses_are_permanent_with_the_sysexits_code(program, status, expected):
    prog = program(f"sys.exit({status})")
    with pytest.raises(PermanentRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("550", expected)
    assert f"exited with status {status}: 550 {expected}" in str(info.value)


async def test_first_output_line_becomes_the_reply_text(program):
    prog = program("print(); print('  No such mailbox: bob\\x1b[31m  '); print('more'); "
                   "sys.exit(67)")
    with pytest.raises(PermanentRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("550", "5.1.1 No such mailbox: bob [31m")


async def test_stderr_is_used_when_stdout_is_silent(program):
    prog = program("sys.stderr.write('prog: disk quota exceeded\\n'); sys.exit(75)")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.3.0 prog: disk quota exceeded")


async def test_a_5xx_first_line_is_permanent_even_with_exit_75(program):
    prog = program("print('5.2.1 Mailbox disabled'); sys.exit(75)")
    with pytest.raises(PermanentRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("550", "5.2.1 Mailbox disabled")
    assert info.value.reply.enhanced_status_code == "5.2.1"


async def test_a_4xx_first_line_is_transient_even_with_another_status(program):
    prog = program("sys.stderr.write('4.2.2 Over quota\\n'); sys.exit(1)")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.2.2 Over quota")


async def test_a_coded_line_on_stderr_wins_over_plain_stdout(program):
    prog = program("print('some chatter'); sys.stderr.write('5.7.1 Rejected by filter\\n');"
                   "sys.exit(75)")
    with pytest.raises(PermanentRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("550", "5.7.1 Rejected by filter")


async def test_tempfail_codes_can_be_chosen(program):
    prog = program("sys.exit(71)")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([prog.path], tempfail_codes={71, 75}).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.3.0 prog: system error")


async def test_output_is_bounded_and_drained(program):
    prog = program("sys.stdout.write('E' * 3_000_000 + '\\n'); sys.stderr.write('x' * 3_000_000);"
                   "sys.exit(1)")
    relay = PipeRelay([prog.path], timeout=20)
    with pytest.raises(PermanentRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert info.value.reply.text == "E" * 256


async def test_killed_by_a_signal_is_transient(program):
    prog = program("os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([prog.path]).attempt(envelope(), 0)
    assert info.value.reply == ("451", "4.3.0 prog killed by SIGTERM")


async def test_a_missing_program_is_transient(tmp_path):
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([str(tmp_path / "missing")]).attempt(envelope(), 0)
    assert info.value.reply.code == "451"
    assert info.value.reply.message.startswith("4.3.0 Could not run missing:")


async def test_a_program_that_is_not_executable_is_transient(tmp_path):
    path = tmp_path / "plain"
    path.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(TransientRelayError) as info:
        await PipeRelay([str(path)]).attempt(envelope(), 0)
    assert "Permission denied" in info.value.reply.message


async def test_a_nul_byte_in_an_argument_is_permanent(program):
    prog = program()
    with pytest.raises(PermanentRelayError) as info:
        await PipeRelay([prog.path, "{sender}"]).attempt(envelope(sender="a\0b@example.com"), 0)
    assert info.value.reply == ("554", "5.3.0 Could not run prog: bad argument")
    assert prog.runs == []


# --- time limits and cancellation --------------------------------------------------


async def test_timeout_kills_the_program_and_what_it_started(program, tmp_path):
    pids = tmp_path / "pids"
    prog = program(f"""
        import subprocess
        child = subprocess.Popen(["sleep", "60"])  # holds our stdout open too
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(60)
    """)
    relay = PipeRelay([prog.path], timeout=1.0)
    start = time.monotonic()
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(), 0)
    assert time.monotonic() - start < 10
    assert info.value.reply == ("451", "4.3.0 prog timed out after 1 s")
    parent, child = (int(p) for p in pids.read_text().split())
    assert wait_gone(parent)
    assert wait_gone(child)


async def test_timeout_applies_to_each_recipient(program):
    prog = program("""
        if argv[0].startswith("slow"):
            time.sleep(60)
    """)
    relay = PipeRelay([prog.path, "{recipient}"], timeout=1.0, per_recipient=True)
    result = await relay.attempt(envelope("slow@example.net", "fast@example.net"), 0)
    assert isinstance(result["slow@example.net"], TransientRelayError)
    assert result["fast@example.net"] is None


async def test_cancelling_the_attempt_kills_the_program(program, tmp_path):
    pidfile = tmp_path / "pid"
    prog = program(f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    task = asyncio.ensure_future(PipeRelay([prog.path]).attempt(envelope(), 0))
    deadline = time.monotonic() + 10
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_gone(int(pidfile.read_text()))


# --- per recipient -----------------------------------------------------------------


async def test_per_recipient_runs_once_each_with_its_own_result(program):
    prog = program("""
        local = argv[1]
        if local == "temp":
            sys.exit(75)
        if local == "gone":
            print("5.1.1 gone@ has left")
            sys.exit(1)
        if local == "nouser":
            sys.exit(67)
    """)
    relay = PipeRelay([prog.path, "-d", "{localpart}", "--domain={domain}", "{recipient}"],
                      per_recipient=True)
    env = envelope("ok@Example.NET", "temp@example.net", "gone@example.net",
                   "nouser@example.net", "ok@Example.NET")
    result = await relay.attempt(env, 0)
    assert list(result) == ["ok@Example.NET", "temp@example.net", "gone@example.net",
                            "nouser@example.net"]
    assert result["ok@Example.NET"] is None
    assert isinstance(result["temp@example.net"], TransientRelayError)
    assert result["temp@example.net"].reply == ("451", "4.3.0 prog: temporary failure")
    assert isinstance(result["gone@example.net"], PermanentRelayError)
    assert result["gone@example.net"].reply == ("550", "5.1.1 gone@ has left")
    assert result["nouser@example.net"].reply == ("550", "5.1.1 prog: user unknown")
    runs = prog.runs
    assert len(runs) == 4  # the duplicate recipient is delivered once
    assert runs[0]["argv"] == ["-d", "ok", "--domain=example.net", "ok@Example.NET"]
    assert all(run["stdin"] == DATA for run in runs)


async def test_relay_policies_run_before_the_program(program):
    class Tag:
        def apply(self, envelope):
            envelope.prepend_header("X-Tag", "yes")

    prog = program()
    relay = PipeRelay([prog.path])
    relay.add_policy(Tag())
    await relay.attempt(envelope(), 0)
    assert prog.runs[0]["stdin"] == b"X-Tag: yes\r\n" + DATA


# --- presets -----------------------------------------------------------------------


@pytest.fixture
def bin_dir(tmp_path, monkeypatch):
    """A directory at the front of PATH for fake maildrop / dovecot-lda programs."""
    path = tmp_path / "bin"
    path.mkdir()
    monkeypatch.setenv("PATH", f"{path}{os.pathsep}{os.environ.get('PATH', '')}")
    return path


async def test_maildrop_runs_once_per_message_for_the_running_user(bin_dir):
    fake = FakeProgram(bin_dir, "maildrop")
    relay = MaildropRelay()
    assert relay.per_recipient is False
    assert await relay.attempt(envelope("bob@example.net", "carol@example.net"), 0) is None
    [run] = fake.runs
    assert run["argv"] == ["-f", "alice@example.com"]
    assert run["stdin"] == b"Return-Path: <alice@example.com>\n" + DATA.replace(b"\r\n", b"\n")


async def test_maildrop_with_a_user_template_runs_per_recipient(bin_dir):
    fake = FakeProgram(bin_dir, "maildrop", """
        if argv[-1] == "nobody":
            sys.stderr.write("maildrop: Invalid user specified.\\n")
            sys.exit(67)
        if argv[-1] == "busy":
            sys.stderr.write("maildrop: Unable to lock mailbox.\\n")
            sys.exit(75)
    """)
    relay = MaildropRelay(extra_args=["-V", "1"], user="{localpart}", timeout=30)
    env = envelope("bob@example.net", "nobody@example.net", "busy@example.net")
    result = await relay.attempt(env, 0)
    assert result["bob@example.net"] is None
    assert result["nobody@example.net"].reply == ("550", "5.1.1 maildrop: Invalid user specified.")
    assert isinstance(result["busy@example.net"], TransientRelayError)
    assert result["busy@example.net"].reply == ("451", "4.3.0 maildrop: Unable to lock mailbox.")
    runs = fake.runs
    assert runs[0]["argv"] == ["-f", "alice@example.com", "-V", "1", "-d", "bob"]
    assert runs[0]["stdin"] == (b"Return-Path: <alice@example.com>\n"
                                b"Delivered-To: bob@example.net\n" + DATA.replace(b"\r\n", b"\n"))


async def test_maildrop_with_a_fixed_user_runs_once(bin_dir):
    fake = FakeProgram(bin_dir, "maildrop")
    relay = MaildropRelay(path=str(bin_dir / "maildrop"), user="vmail")
    assert await relay.attempt(envelope("bob@example.net", "carol@example.net"), 0) is None
    assert [r["argv"] for r in fake.runs] == [["-f", "alice@example.com", "-d", "vmail"]]


async def test_dovecot_lda_argv_per_recipient(bin_dir):
    fake = FakeProgram(bin_dir, "dovecot-lda", """
        if argv[-1] == "quota@example.net":
            sys.stderr.write("Quota exceeded (mailbox for user is full)\\n")
            sys.exit(77)
        if argv[-1] == "nobody@example.net":
            sys.exit(67)
    """)
    relay = DovecotLdaRelay(path=fake.path, extra_args=["-c", "/etc/dc.conf"])
    env = envelope("bob@example.net", "quota@example.net", "nobody@example.net", sender="")
    result = await relay.attempt(env, 0)
    assert result["bob@example.net"] is None
    assert result["quota@example.net"].reply == (
        "550", "5.7.0 Quota exceeded (mailbox for user is full)")
    assert result["nobody@example.net"].reply == ("550", "5.1.1 dovecot-lda: user unknown")
    runs = fake.runs
    assert runs[0]["argv"] == ["-e", "-f", "", "-a", "bob@example.net", "-c", "/etc/dc.conf",
                               "-d", "bob@example.net"]
    assert runs[0]["stdin"] == (b"Return-Path: <>\nDelivered-To: bob@example.net\n"
                                + DATA.replace(b"\r\n", b"\n"))


async def test_dovecot_lda_without_user_lookup(bin_dir):
    fake = FakeProgram(bin_dir, "dovecot-lda")
    relay = DovecotLdaRelay(path="dovecot-lda", user=None)
    await relay.attempt(envelope("bob@example.net"), 0)
    assert fake.runs[0]["argv"] == ["-e", "-f", "alice@example.com", "-a", "bob@example.net"]


def test_preset_defaults():
    assert DovecotLdaRelay().build_args(envelope(), "bob@example.net")[0] == (
        "/usr/lib/dovecot/dovecot-lda")
    assert MaildropRelay().build_args(envelope()) == ["maildrop", "-f", "alice@example.com"]
    with pytest.raises(ValueError, match="unknown macro"):
        MaildropRelay(user="{user}")


# --- the real dovecot-lda ------------------------------------------------------------

LDA = "/usr/lib/dovecot/dovecot-lda"


@pytest.fixture
def dovecot(tool):
    """A Dovecot instance (no protocols: only its auth service) with user alice.

    Its files live in a fresh directory outside pytest's private (0700) tree,
    because Dovecot's auth service and the LDA run as an unprivileged user.
    """
    dovecot_bin = tool("dovecot")
    if not os.access(LDA, os.X_OK):
        pytest.fail(f"{LDA} is not installed (Debian package dovecot-core, see .ci/run)")
    base = daemon_dir("slimta-lda-")
    conf, mail = dovecot_setup(base, ["alice"])
    start_dovecot(dovecot_bin, conf)
    with open(os.path.join(base, "run", "master.pid")) as f:
        master = int(f.read())
    try:
        yield conf, os.path.join(mail, "alice")
    finally:
        os.kill(master, signal.SIGTERM)
        wait_gone(master, 10)
        log = os.path.join(base, "dovecot.log")
        if os.path.exists(log):
            with open(log) as f:
                print(f.read())
        shutil.rmtree(base, ignore_errors=True)


async def test_real_dovecot_lda_delivers_into_a_maildir(dovecot):
    conf, maildir = dovecot
    relay = DovecotLdaRelay(extra_args=["-c", conf], timeout=60)
    env = envelope("alice@example.test", "nobody@example.test", sender="bob@example.org")
    result = await relay.attempt(env, 0)
    assert result["alice@example.test"] is None
    assert isinstance(result["nobody@example.test"], PermanentRelayError)
    assert result["nobody@example.test"].reply == ("550", "5.1.1 dovecot-lda: user unknown")
    new = os.path.join(maildir, "new")
    [name] = os.listdir(new)
    with open(os.path.join(new, name), "rb") as f:
        stored = f.read()
    assert stored == (b"Return-Path: <bob@example.org>\nDelivered-To: alice@example.test\n"
                      + DATA.replace(b"\r\n", b"\n"))
    assert stat.S_ISREG(os.stat(os.path.join(new, name)).st_mode)
