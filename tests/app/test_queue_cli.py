"""`slimta queue --db FILE ...`: every subcommand, run as a subprocess on a real SQLite queue."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from slimta.app.queuecli import BATCH, queue_file_in_use
from slimta.envelope import Envelope
from slimta.queue.sqlite import SqliteStorage

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

FUTURE = time.time() + 3600
ATTEMPTED = 1700000000.25


def run(db, *args, input=None):
    return subprocess.run([*CLI, "queue", "--db", str(db), *args], capture_output=True,
                          env=ENV, timeout=60, input=input)


def envelope(sender, rcpts, subject="hi"):
    env = Envelope(sender, list(rcpts))
    env.parse(f"From: <{sender}>\r\nSubject: {subject}\r\n\r\nhello {subject}\r\n".encode())
    env.client.update(ip="192.0.2.1", name="client.test", protocol="ESMTP")
    env.receiver = "mx.test"
    env.timestamp = time.time() - 60
    return env


async def build_queue(path) -> dict[str, str]:
    """Three messages: 'fresh' (due), 'deferred' (an attempt, one rcpt done), 'held'."""
    async with SqliteStorage(path) as store:
        fresh = await store.write(envelope("a@example.com", ["b@example.org"], "fresh"),
                                  time.time())
        deferred = await store.write(
            envelope("c@example.com", ["d@example.org", "e@example.net"], "deferred"), FUTURE)
        await store.record_attempt(deferred, FUTURE, [0], "451 4.4.1 Connection refused",
                                   attempted_at=ATTEMPTED)
        held = await store.write(envelope("f@example.com", ["g@example.org"], "held"), FUTURE)
        await store.set_held(held, True)
    return {"fresh": fresh, "deferred": deferred, "held": held}


@pytest.fixture
def queue(tmp_path):
    path = tmp_path / "queue.db"
    ids = asyncio.run(build_queue(path))
    return path, ids


async def read(path, id):
    async with SqliteStorage(path) as store:
        return await store.get(id)


def stored(path, id):
    return asyncio.run(read(path, id))


def listing(path) -> dict[str, dict]:
    out = run(path, "list", "--json")
    assert out.returncode == 0, out.stderr
    return {item["id"]: item for item in json.loads(out.stdout)}


def test_list_text(queue):
    path, ids = queue
    out = run(path, "list")
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert f"{ids['held']}!" in text
    assert f"{ids['fresh']} " in text
    assert "<a@example.com>" in text and "<b@example.org>" in text
    # the delivered recipient of 'deferred' is not listed, the other one is
    assert "<d@example.org>" not in text and "<e@example.net>" in text
    assert "attempts 1" in text and "last reply: 451 4.4.1 Connection refused" in text
    assert "due now" in text and "held" in text and "next attempt" in text
    assert "-- 3 messages (1 held), 3 recipients" in text


def test_list_json(queue):
    path, ids = queue
    items = listing(path)
    assert set(items) == set(ids.values())
    d = items[ids["deferred"]]
    assert d["sender"] == "c@example.com"
    assert d["recipients"] == ["e@example.net"]
    assert d["attempts"] == 1
    assert d["last_reply"] == "451 4.4.1 Connection refused"
    assert d["next_attempt"] == pytest.approx(FUTURE)
    assert d["held"] is False and items[ids["held"]]["held"] is True
    assert d["size"] > 0 and d["arrival"] == pytest.approx(time.time(), abs=60)


def test_list_empty_queue(tmp_path):
    path = tmp_path / "empty.db"
    asyncio.run(SqliteStorage(path).open())
    out = run(path, "list")
    assert out.returncode == 0
    assert out.stdout.decode().strip() == "Mail queue is empty"
    assert json.loads(run(path, "list", "--json").stdout) == []


def test_show_text_and_json(queue):
    path, ids = queue
    out = run(path, "show", ids["deferred"])
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "state:        queued" in text
    assert "recipient:    <d@example.org> (delivered)" in text
    assert "recipient:    <e@example.net>\n" in text
    assert "ip=192.0.2.1" in text and "received by:  mx.test" in text
    assert "last reply:   451 4.4.1 Connection refused" in text
    attempted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ATTEMPTED))
    assert f"attempt:      {attempted}: 451 4.4.1 Connection refused\n" in text
    assert text.endswith("Subject: deferred\r\n\r\nhello deferred\r\n")

    data = json.loads(run(path, "show", "--json", ids["deferred"]).stdout)
    assert data["id"] == ids["deferred"]
    assert data["recipients"] == ["d@example.org", "e@example.net"]
    assert data["pending"] == ["e@example.net"]
    assert data["delivered"] == ["d@example.org"]
    assert data["history"] == [[ATTEMPTED, "451 4.4.1 Connection refused"]]
    assert data["envelope"]["client"]["ip"] == "192.0.2.1"
    assert data["envelope"]["v"] == 1
    assert data["message"].endswith("hello deferred\r\n")


def test_show_by_unique_prefix(queue):
    path, ids = queue
    prefix = ids["held"][:12]
    out = run(path, "show", prefix, "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["held"] is True


def test_show_missing_id(queue):
    path, _ = queue
    out = run(path, "show", "0" * 32)
    assert out.returncode == 1
    assert b"no message" in out.stderr
    assert out.stdout == b""


def test_hold_and_release_are_visible_in_list(queue):
    path, ids = queue
    out = run(path, "hold", ids["fresh"], ids["deferred"])
    assert out.returncode == 0, out.stderr
    assert b"held 2 messages" in out.stderr
    items = listing(path)
    assert all(item["held"] for item in items.values())
    assert "3 held" in run(path, "list").stdout.decode()

    out = run(path, "release", "--json", ids["held"], ids["deferred"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"done": [ids["held"], ids["deferred"]], "missing": []}
    items = listing(path)
    assert items[ids["fresh"]]["held"] is True
    for key in ("held", "deferred"):
        assert items[ids[key]]["held"] is False
        assert items[ids[key]]["next_attempt"] <= time.time()  # released: due now


def test_retry_makes_due_now(queue):
    path, ids = queue
    out = run(path, "retry", ids["deferred"])
    assert out.returncode == 0, out.stderr
    assert stored(path, ids["deferred"]).timestamp <= time.time()
    assert stored(path, ids["held"]).timestamp == pytest.approx(FUTURE)


def test_retry_all_and_flush_skip_held(queue):
    path, ids = queue
    out = run(path, "retry", "--all", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert sorted(result["done"]) == sorted([ids["fresh"], ids["deferred"]])
    assert stored(path, ids["deferred"]).timestamp <= time.time()
    assert stored(path, ids["held"]).timestamp == pytest.approx(FUTURE)

    out = run(path, "flush")
    assert out.returncode == 0, out.stderr
    assert b"flushed 2 messages" in out.stderr


def test_retry_usage_errors(queue):
    path, ids = queue
    assert run(path, "retry").returncode == 2
    assert run(path, "retry", "--all", ids["fresh"]).returncode == 2
    assert run(path, "hold").returncode == 2
    assert run(path, "frobnicate").returncode == 2


def test_delete(queue):
    path, ids = queue
    out = run(path, "delete", "--json", ids["fresh"], ids["held"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["done"] == [ids["fresh"], ids["held"]]
    assert set(listing(path)) == {ids["deferred"]}


@pytest.mark.parametrize("command", ["retry", "hold", "release", "delete"])
def test_missing_ids_exit_1_and_the_others_are_processed(queue, command):
    path, ids = queue
    missing = "f" * 32
    out = run(path, command, "--json", missing, ids["deferred"], "nosuchprefix")
    assert out.returncode == 1
    result = json.loads(out.stdout)
    assert result["done"] == [ids["deferred"]]
    assert sorted(result["missing"]) == sorted([missing, "nosuchprefix"])
    assert f"no message {missing}".encode() in out.stderr
    items = listing(path)
    if command == "delete":
        assert ids["deferred"] not in items
    elif command == "hold":
        assert items[ids["deferred"]]["held"] is True
    else:
        assert items[ids["deferred"]]["next_attempt"] <= time.time()


def test_stats_text_and_json(queue):
    path, _ = queue
    data = json.loads(run(path, "stats", "--json").stdout)
    assert data["messages"] == 3 and data["held"] == 1 and data["recipients"] == 3
    assert data["bytes"] > 0
    text = run(path, "stats").stdout.decode()
    assert "messages:   3" in text and "held:       1" in text


def test_missing_or_foreign_file_is_exit_2(tmp_path):
    out = run(tmp_path / "nope.db", "list")
    assert out.returncode == 2
    assert b"no queue file" in out.stderr
    assert not (tmp_path / "nope.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    out = run(junk, "stats")
    assert out.returncode == 2
    assert b"cannot open the queue" in out.stderr


def test_db_from_environment(queue):
    path, _ = queue
    out = subprocess.run([*CLI, "queue", "list", "--json"], capture_output=True, timeout=60,
                         env=dict(ENV, SLIMTA_QUEUE_DB=str(path)))
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 3


async def test_changes_refused_while_another_process_has_the_file_open(queue):
    path, ids = queue
    async with SqliteStorage(path) as store:  # stands in for a running daemon
        assert await store.stats()
        out = await asyncio.to_thread(run, path, "hold", ids["fresh"])
        assert out.returncode == 2
        assert b"open in another process" in out.stderr
        assert (await store.get(ids["fresh"])).held is False
        # reading is safe while a daemon runs
        out = await asyncio.to_thread(run, path, "list", "--json")
        assert out.returncode == 0, out.stderr
        assert len(json.loads(out.stdout)) == 3
    assert not queue_file_in_use(path)
    assert run(path, "hold", ids["fresh"]).returncode == 0


async def _fill(path, n):
    async with SqliteStorage(path) as store:
        await asyncio.gather(*(store.write(envelope("a@example.com", [f"r{i}@example.org"]),
                                           FUTURE) for i in range(n)))


def test_retry_all_reports_progress(tmp_path):
    path = tmp_path / "big.db"
    n = BATCH + 100
    asyncio.run(_fill(path, n))
    out = run(path, "retry", "--all")
    assert out.returncode == 0, out.stderr
    err = out.stderr.decode()
    assert f"retried {BATCH}/{n}" in err
    assert f"retried {n}/{n}" in err
    assert f"retried {n} messages" in err
    assert all(item["next_attempt"] <= time.time() for item in listing(path).values())


def test_help_documents_exit_codes():
    out = subprocess.run([*CLI, "queue", "--help"], capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 0
    text = out.stdout.decode()
    assert "Exit codes" in text and "not found" in text
    for command in ("list", "show", "retry", "delete", "hold", "release", "flush", "stats"):
        assert command in text
