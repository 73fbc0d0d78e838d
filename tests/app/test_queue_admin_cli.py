"""`slimta queue --admin URL ...` against a real `slimta serve` whose relay cannot deliver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_serve import CLI, connect, free_port, wait_for

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
ENV.pop("SLIMTA_QUEUE_DB", None)
ENV.pop("SLIMTA_ADMIN_URL", None)
ENV.pop("SLIMTA_ADMIN_TOKEN", None)
TOKEN = "s3cret-admin-token"


@dataclass
class Daemon:
    """A running `slimta serve`: its SMTP port, admin URL and data directory."""

    proc: subprocess.Popen
    smtp: int
    url: str
    data: Path

    def send(self, sender: str, rcpts: list[str], subject: str) -> None:
        with connect(self.smtp, self.proc) as client:
            msg = f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nhello {subject}\r\n"
            assert client.sendmail(sender, rcpts, msg.encode()) == {}

    def queue(self, *args: str, token: str | None = TOKEN, admin: bool = True,
              **env: str) -> subprocess.CompletedProcess:
        extra = dict(env)
        opts: list[str] = []
        if admin:
            opts += ["--admin", self.url]
        if token is not None:
            extra["MY_TOKEN"] = token
            opts += ["--token-env", "MY_TOKEN"]
        return subprocess.run([*CLI, "queue", *opts, *args], capture_output=True, text=True,
                              env=dict(ENV, **extra), timeout=60)

    def json(self, *args: str) -> object:
        out = self.queue(*args, "--json")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


def config(tmp_path: Path, smtp: int, admin: int, queues: tuple[str, ...] = ("q",)) -> Path:
    """An edge into each queue, whose static relay points at a closed port: mail waits.

    The first edge listens on ``smtp``, the others on free ports.
    """
    ports = [smtp] + [free_port() for _ in queues[1:]]
    edges = "\n".join(
        f"  {q}in: {{type: smtp, queue: {q}, listener: '127.0.0.1:{port}'}}"
        for q, port in zip(queues, ports, strict=True))
    qs = "\n".join(f"  {q}: {{type: sqlite, relay: out, retry: {{maximum: 20, delay: '3600'}}}}"
                   for q in queues)
    path = tmp_path / "slimta.yaml"
    path.write_text(f"""
process:
  slimta:
    data_dir: data
    admin: {{listener: '127.0.0.1:{admin}', token: {TOKEN}}}
edge:
{edges}
queue:
{qs}
relay:
  out: {{type: static, host: 127.0.0.1, port: {free_port()}, starttls: false}}
""")
    return path


def start(tmp_path: Path, queues: tuple[str, ...] = ("q",)) -> Daemon:
    smtp = free_port()
    admin = free_port()
    path = config(tmp_path, smtp, admin, queues)
    proc = subprocess.Popen([*CLI, "serve", "-c", str(path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    return Daemon(proc, smtp, f"http://127.0.0.1:{admin}", tmp_path / "data")


def stop(daemon: Daemon) -> None:
    try:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.proc.communicate(timeout=30)
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.communicate()




@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon with three messages, each attempted once and deferred for an hour."""
    d = start(tmp_path_factory.mktemp("admin"))
    try:
        d.send("a@example.com", ["b@example.org"], "first")
        d.send("c@example.com", ["d@example.org", "e@example.net"], "second")
        d.send("f@example.com", ["g@example.org"], "third")
        wait_for(lambda: [e["attempts"] for e in d.json("list")] == [1, 1, 1],
                 "the first attempts")
        yield d
    finally:
        stop(d)


def ids_by_sender(d: Daemon) -> dict[str, str]:
    return {e["sender"]: e["id"] for e in d.json("list")}


def test_list(daemon):
    entries = daemon.json("list")
    assert len(entries) == 3
    assert set(entries[0]) == {"id", "size", "arrival", "sender", "recipients", "attempts",
                               "next_attempt", "last_reply", "held"}
    by_sender = {e["sender"]: e for e in entries}
    assert by_sender["c@example.com"]["recipients"] == ["d@example.org", "e@example.net"]
    assert all(e["next_attempt"] > time.time() + 3000 for e in entries)
    assert all(e["last_reply"] and not e["held"] for e in entries)
    text = daemon.queue("list")
    assert text.returncode == 0, text.stderr
    assert "-- 3 messages (0 held), 4 recipients" in text.stdout
    assert "<d@example.org>" in text.stdout and "next attempt" in text.stdout


def test_show(daemon):
    qid = ids_by_sender(daemon)["c@example.com"]
    detail = daemon.json("show", qid[:10])  # a unique prefix
    assert detail["id"] == qid
    assert detail["recipients"] == ["d@example.org", "e@example.net"]
    assert detail["pending"] == detail["recipients"] and detail["delivered"] == []
    assert detail["attempts"] == 1 and detail["held"] is False
    [[_, reply]] = detail["history"]  # through the admin endpoint too
    assert reply == detail["last_reply"]
    assert detail["envelope"]["sender"] == "c@example.com"
    assert "Subject: second" in detail["message"] and "hello second" in detail["message"]
    assert detail["size"] == len(detail["message"].encode())
    text = daemon.queue("show", qid)
    assert text.returncode == 0, text.stderr
    assert f"id:           {qid}" in text.stdout
    assert "recipient:    <e@example.net>" in text.stdout
    assert "hello second" in text.stdout


def test_missing_id_exits_1(daemon):
    missing = "0" * 32
    out = daemon.queue("show", missing)
    assert out.returncode == 1
    assert f"no message {missing}" in out.stderr
    out = daemon.queue("hold", missing, "--json")
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"done": [], "missing": [missing]}
    qid = ids_by_sender(daemon)["a@example.com"]
    out = daemon.queue("retry", qid, missing, "--json")  # the others are still processed
    assert out.returncode == 1
    assert json.loads(out.stdout) == {"done": [qid], "missing": [missing]}


def test_hold_release(daemon):
    qid = ids_by_sender(daemon)["f@example.com"]
    assert daemon.json("hold", qid) == {"done": [qid], "missing": []}
    assert daemon.json("show", qid)["held"] is True
    assert daemon.json("stats")["held"] == 1
    assert "-- 3 messages (1 held)" in daemon.queue("list").stdout
    assert daemon.json("release", qid) == {"done": [qid], "missing": []}
    # released: attempted at once, fails again, deferred
    wait_for(lambda: daemon.json("show", qid)["attempts"] >= 2, "the attempt after release")
    detail = daemon.json("show", qid)
    assert detail["held"] is False and detail["next_attempt"] > time.time() + 3000


def test_retry_attempts_now(daemon):
    qid = ids_by_sender(daemon)["c@example.com"]
    before = daemon.json("show", qid)["attempts"]
    out = daemon.queue("retry", qid)
    assert out.returncode == 0, out.stderr
    assert "retried 1 message" in out.stderr
    wait_for(lambda: daemon.json("show", qid)["attempts"] > before, "the retry's attempt")


def settled(d: Daemon) -> bool:
    """No message is due or being attempted: each waits for its next attempt in an hour."""
    return all(e["next_attempt"] > time.time() + 3000 for e in d.json("list")) and \
        d.json("stats").get("attempting", 0) == 0


def test_flush_skips_held(daemon):
    wait_for(lambda: settled(daemon), "the earlier attempts")
    ids = ids_by_sender(daemon)
    held = ids["a@example.com"]
    daemon.json("hold", held)
    try:
        before = {e["id"]: e["attempts"] for e in daemon.json("list")}
        result = daemon.json("flush")
        assert sorted(result["done"]) == sorted(i for i in ids.values() if i != held)
        assert result["missing"] == []

        def flushed() -> bool:
            now = {e["id"]: e["attempts"] for e in daemon.json("list")}
            return all(now[i] > before[i] for i in result["done"]) and now[held] == before[held]

        wait_for(flushed, "the flushed attempts")
        assert sorted(daemon.json("retry", "--all")["done"]) == sorted(result["done"])
    finally:
        daemon.json("release", held)


def test_stats(daemon):
    stats = daemon.json("stats")
    assert stats["messages"] == 3 and stats["recipients"] == 4
    assert stats["bytes"] == sum(e["size"] for e in daemon.json("list"))
    text = daemon.queue("stats")
    assert text.returncode == 0 and "messages:   3" in text.stdout


def test_wrong_or_no_token_exits_2(daemon):
    out = daemon.queue("list", token="wrong")
    assert out.returncode == 2
    assert "401 Unauthorized: the token was refused" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    out = daemon.queue("list", token=None)
    assert out.returncode == 2 and "it requires a token" in out.stderr
    # $SLIMTA_ADMIN_TOKEN is the default
    out = daemon.queue("stats", token=None, SLIMTA_ADMIN_TOKEN=TOKEN)
    assert out.returncode == 0, out.stderr


def test_env_url_and_option_errors(daemon, tmp_path):
    out = daemon.queue("stats", admin=False, SLIMTA_ADMIN_URL=daemon.url)
    assert out.returncode == 0, out.stderr
    out = daemon.queue("--db", str(tmp_path / "q.db"), "stats")
    assert out.returncode == 2 and "--db and --admin are mutually exclusive" in out.stderr
    out = daemon.queue("stats", admin=False, token=None)
    assert out.returncode == 2 and "give --db PATH" in out.stderr
    out = daemon.queue("--queue", "nope", "stats")
    assert out.returncode == 2 and "no queue named 'nope' (it has: q)" in out.stderr
    out = subprocess.run([*CLI, "queue", "--admin", daemon.url, "--token-env", "UNSET_VAR",
                          "stats"], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and "UNSET_VAR: the variable is not set" in out.stderr


def test_delete(daemon):
    qid = ids_by_sender(daemon)["a@example.com"]
    out = daemon.queue("delete", qid)
    assert out.returncode == 0, out.stderr
    assert "deleted 1 message" in out.stderr
    assert qid not in ids_by_sender(daemon).values()
    assert daemon.queue("show", qid).returncode == 1
    assert daemon.queue("delete", qid).returncode == 1


def test_unreachable_daemon_exits_2():
    out = subprocess.run([*CLI, "queue", "--admin", f"127.0.0.1:{free_port()}", "list"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2
    assert "cannot reach the admin endpoint at http://127.0.0.1:" in out.stderr
    assert "Traceback" not in out.stderr


def test_several_queues_need_queue_option(tmp_path):
    d = start(tmp_path, queues=("inbound", "outbound"))
    try:
        d.send("a@example.com", ["b@example.org"], "x")
        wait_for(lambda: d.json("--queue", "inbound", "list"), "the message")
        out = d.queue("list")
        assert out.returncode == 2
        assert "has 2 queues, choose one with --queue NAME: inbound, outbound" in out.stderr
        assert d.json("--queue", "outbound", "list") == []
    finally:
        stop(d)
