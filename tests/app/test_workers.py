"""`slimta serve --workers N`: a supervisor, workers on shared sockets, per-worker queues."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_serve import CLI, ENV, connect, free_port, wait_for

from slimta.app.config import parse_config
from slimta.app.workers import (
    Supervisor,
    orphan_queue_files,
    per_worker_path,
    restart_delay,
)
from slimta.envelope import Envelope
from slimta.queue.sqlite import SqliteStorage

CONFIG = """
process:
  slimta: {{data_dir: data{process}}}
edge:
  in:
    type: smtp
    queue: q
    listener: {listeners}
    rules: {{banner: '{banner}'}}
queue:
  q: {{type: sqlite, relay: md}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
"""

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def write(path: Path, ports: list[int], banner: str = "first banner", process: str = "") -> None:
    listeners = "[" + ", ".join(f"'127.0.0.1:{p}'" for p in ports) + "]"
    path.write_text(CONFIG.format(listeners=listeners, banner=banner, process=process))


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([*CLI, "serve", "-c", str(tmp_path / "slimta.yaml"), *args],
                            stdout=subprocess.PIPE, stderr=log, env=ENV, cwd=tmp_path)


def log_text(tmp_path: Path) -> str:
    return (tmp_path / "stderr.log").read_text(errors="replace")




def worker_pids(tmp_path: Path) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's log."""
    return {int(n): int(pid) for n, pid in STARTED.findall(log_text(tmp_path))}


def ready(tmp_path: Path, count: int) -> bool:
    return f"{count} workers ready" in log_text(tmp_path)


def greeting(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline().decode()


def maildir_tokens(tmp_path: Path) -> list[str]:
    new = tmp_path / "data/mail/new"
    if not new.is_dir():
        return []
    tokens = []
    for entry in new.iterdir():
        found = re.search(rb"token-(\d+)", entry.read_bytes())
        if found:
            tokens.append(found.group(1).decode())
    return tokens


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(60)
    finally:
        proc.kill()


class Sender(threading.Thread):
    """Sends its messages, a new connection every 5; a message whose session broke is sent
    again (as an MTA would), so every message ends acknowledged."""

    def __init__(self, port: int, tokens: list[int], acked: list[str]):
        super().__init__(daemon=True)
        self.port, self.tokens, self.acked = port, tokens, acked
        self.broken = 0

    def run(self) -> None:
        client = None
        sent_here = 0
        for token in self.tokens:
            for _ in range(50):
                try:
                    if client is None or sent_here >= 5:
                        if client is not None:
                            client.quit()
                        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
                        sent_here = 0
                    body = f"Subject: m{token}\r\n\r\ntoken-{token}\r\n".encode()
                    client.sendmail("a@example.net", ["b@example.org"], body)
                    sent_here += 1
                    self.acked.append(str(token))
                    break
                except (smtplib.SMTPException, OSError):
                    self.broken += 1
                    client = None
                    time.sleep(0.05)
        if client is not None:
            client.quit()


def test_two_workers_share_load_survive_kill_reload_and_stop(tmp_path):
    port = free_port()
    config = tmp_path / "slimta.yaml"
    write(config, [port])
    proc = start(tmp_path, "--workers", "2")
    try:
        connect(port, proc).quit()
        wait_for(lambda: ready(tmp_path, 2), what="2 workers ready")
        first = worker_pids(tmp_path)
        assert sorted(first) == [1, 2]
        # the workers are the supervisor's children
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert sorted(map(int, children)) == sorted(first.values())

        acked: list[str] = []
        senders = [Sender(port, list(range(i, 200, 8)), acked) for i in range(8)]
        for s in senders:
            s.start()
        wait_for(lambda: len(acked) >= 60, what="60 messages acknowledged")
        os.kill(first[1], signal.SIGKILL)  # mid-load
        wait_for(lambda: worker_pids(tmp_path)[1] != first[1], what="worker 1 restarted")
        for s in senders:
            s.join(120)
        assert len(set(acked)) == 200
        # nothing acknowledged is lost: worker 1's queue file is reopened by its successor
        wait_for(lambda: set(maildir_tokens(tmp_path)) >= set(acked), timeout=60,
                 what="every acknowledged message in the Maildir")
        log = log_text(tmp_path)
        assert re.search(r"worker 1: pid \d+ ended after [\d.]+s, killed by SIGKILL; "
                         r"restarting it in", log)
        # both workers accepted connections, and log their number
        assert "[worker 1] slimta.edge.smtp queued" in log
        assert "[worker 2] slimta.edge.smtp queued" in log
        assert (tmp_path / "data/q.1.db").exists() and (tmp_path / "data/q.2.db").exists()
        assert not (tmp_path / "data/q.db").exists()
        second = worker_pids(tmp_path)
        assert second[2] == first[2] and gone(first[1])
        wait_for(lambda: f"worker 1 (pid {second[1]}) ready" in log_text(tmp_path),
                 what="the new worker 1 ready")
        # clients connecting afterwards are served (by either worker)
        for n in range(6):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert client.sendmail("a@example.net", ["b@example.org"],
                                       f"\r\ntoken-{1000 + n}\r\n".encode()) == {}

        # SIGHUP reaches every worker
        write(config, [port], banner="second banner")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: all("second banner" in greeting(port) for _ in range(8)),
                 what="the new banner from both workers")
        wait_for(lambda: log_text(tmp_path).count("SIGHUP: reloading the config") == 3,
                 what="the supervisor and both workers reloading")

        assert stop(proc) == 0
        assert all(gone(pid) for pid in second.values())
        log = log_text(tmp_path)
        assert "all workers stopped" in log
        out = proc.stdout.read().decode()
        assert f"in: SMTP on 127.0.0.1:{port} -> queue q (2 workers)" in out
    finally:
        proc.kill()


def test_reload_adds_a_listener_and_workers_restart_one_by_one(tmp_path):
    port, added = free_port(), free_port()
    config = tmp_path / "slimta.yaml"
    write(config, [port], process=", workers: 2")  # the count from the config
    proc = start(tmp_path)
    try:
        connect(port, proc).quit()
        wait_for(lambda: ready(tmp_path, 2), what="2 workers ready")
        before = worker_pids(tmp_path)
        write(config, [port, added])
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "new: 127.0.0.1:" in log_text(tmp_path), what="the new listener")
        wait_for(lambda: len(STARTED.findall(log_text(tmp_path))) == 4,
                 what="both workers replaced")
        wait_for(lambda: log_text(tmp_path).count(") ready") == 4, what="replacements ready")
        after = worker_pids(tmp_path)
        assert all(after[n] != before[n] for n in (1, 2))
        for p in (port, added):
            with smtplib.SMTP("127.0.0.1", p, timeout=10) as client:
                assert client.noop()[0] == 250
        assert stop(proc) == 0
    finally:
        proc.kill()


def test_one_worker_is_the_single_process(tmp_path):
    port = free_port()
    write(tmp_path / "slimta.yaml", [port])
    proc = start(tmp_path, "--workers", "1")
    try:
        with connect(port, proc) as client:
            assert client.sendmail("a@example.net", ["b@example.org"], b"\r\ntoken-1\r\n") == {}
        wait_for(lambda: maildir_tokens(tmp_path) == ["1"], what="the message delivered")
        assert Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split() == []
        assert (tmp_path / "data/q.db").exists() and not (tmp_path / "data/q.1.db").exists()
        assert stop(proc) == 0
        assert f"in: SMTP on 127.0.0.1:{port} -> queue q\n" in proc.stdout.read().decode()
        assert "supervisor" not in log_text(tmp_path)
    finally:
        proc.kill()


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path):
    """Worker 2's admin port (the configured one + 1) is taken: exit 1, nothing left running."""
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        write(tmp_path / "slimta.yaml", [port],
              process=f", admin: {{listener: '127.0.0.1:{taken - 1}'}}")
        proc = start(tmp_path, "--workers", "2")
        try:
            assert proc.wait(60) == 1
        finally:
            proc.kill()
    log = log_text(tmp_path)
    assert "cannot listen" in log and "a worker could not start" in log
    assert all(gone(pid) for pid in worker_pids(tmp_path).values())


def test_workers_stop_when_the_supervisor_dies(tmp_path):
    port = free_port()
    write(tmp_path / "slimta.yaml", [port])
    proc = start(tmp_path, "--workers", "2")
    try:
        connect(port, proc).quit()
        wait_for(lambda: ready(tmp_path, 2), what="2 workers ready")
        pids = worker_pids(tmp_path)
        proc.kill()
        proc.wait(10)
        wait_for(lambda: all(gone(p) for p in pids.values()), what="the workers to stop")
        assert "the supervisor is gone: stopping" in log_text(tmp_path)
    finally:
        proc.kill()


STAND_IN = r"""
import json, os, sys, time
info = json.loads(os.environ["SLIMTA_WORKER"])
os.write(info["ready"], b"ready\n")
time.sleep(float(sys.argv[1]))
sys.exit(3)
"""


def test_supervisor_restarts_with_back_off(caplog):
    """A worker that keeps failing at once is restarted after 1 s, 2 s, ... (logged)."""
    caplog.set_level(logging.INFO, logger="slimta.app.workers")
    supervisor = Supervisor(1, [sys.executable, "-c", STAND_IN, "0.2"], {}, lambda: None,
                            shutdown_timeout=5)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(4.0, os.kill, os.getpid(), signal.SIGTERM)
        return await supervisor.run()

    assert asyncio.run(main()) == 0
    text = caplog.text
    assert "exit status 3; restarting it in 1s" in text
    assert "restarting it in 2s; it failed 2 times in a row within 10s of starting" in text
    assert "all workers stopped" in text
    assert [restart_delay(n) for n in range(9)] == [0.1, 1, 2, 4, 8, 16, 32, 60, 60]


def test_per_worker_files_and_orphans(tmp_path):
    assert per_worker_path("/d/queue.db", 2) == "/d/queue.2.db"
    assert per_worker_path("/d/queue", 1) == "/d/queue.1"
    config = parse_config({"process": {"slimta": {"data_dir": str(tmp_path)}},
                           "queue": {"q": {"type": "sqlite"}, "m": {"type": "memory"}}})
    for name in ("q.db", "q.1.db", "q.2.db", "q.3.db", "q.x.db"):
        (tmp_path / name).write_text("")
    assert orphan_queue_files(config, 1) == [str(tmp_path / f"q.{i}.db") for i in (1, 2, 3)]
    assert orphan_queue_files(config, 2) == [str(tmp_path / "q.db"), str(tmp_path / "q.3.db")]
    assert orphan_queue_files(config, 3) == [str(tmp_path / "q.db")]


async def fill(path: Path, tokens: list[str]) -> list[str]:
    async with SqliteStorage(path) as store:
        ids = []
        for token in tokens:
            env = Envelope("a@example.com", ["b@example.org"])
            env.parse(f"Subject: {token}\r\n\r\n{token}\r\n".encode())
            ids.append(await store.write(env, time.time() + 3600))
        return ids


def queue_cli(db: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "queue", "--db", str(db), *args], capture_output=True,
                          text=True, env=ENV, timeout=60)


def test_queue_commands_cover_the_worker_files(tmp_path):
    one = asyncio.run(fill(tmp_path / "q.1.db", ["w1a", "w1b"]))
    two = asyncio.run(fill(tmp_path / "q.2.db", ["w2a"]))
    db = tmp_path / "q.db"  # the configured path: it does not exist itself
    out = queue_cli(db, "list", "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(e["id"] for e in json.loads(out.stdout)) == sorted(one + two)
    out = queue_cli(db, "stats", "--json")
    assert json.loads(out.stdout)["messages"] == 3
    out = queue_cli(db, "show", two[0][:8])
    assert out.returncode == 0 and "w2a" in out.stdout
    out = queue_cli(db, "hold", one[1], two[0], "--json")
    assert out.returncode == 0, out.stderr
    assert sorted(json.loads(out.stdout)["done"]) == sorted([one[1], two[0]])
    out = queue_cli(db, "delete", one[0], two[0], "0" * 32, "--json")
    assert out.returncode == 1  # one id is in no file
    result = json.loads(out.stdout)
    assert sorted(result["done"]) == sorted([one[0], two[0]])
    assert result["missing"] == ["0" * 32]
    out = queue_cli(db, "list", "--json")
    assert [(e["id"], e["held"]) for e in json.loads(out.stdout)] == [(one[1], True)]
    # a single file is used as before
    out = queue_cli(tmp_path / "q.2.db", "list", "--json")
    assert out.returncode == 0 and json.loads(out.stdout) == []


def test_http_edges_are_shared_by_the_workers_too(tmp_path):
    """The supervisor binds an HTTP edge's listener once, like an SMTP edge's."""
    import base64
    import urllib.request

    smtp_port, http_port = free_port(), free_port()
    write(tmp_path / "slimta.yaml", [smtp_port])
    text = (tmp_path / "slimta.yaml").read_text().replace(
        "queue:\n", f"  web: {{type: http, queue: q, listener: '127.0.0.1:{http_port}'}}\n"
        "queue:\n", 1)
    (tmp_path / "slimta.yaml").write_text(text)
    proc = start(tmp_path, "--workers", "2")
    try:
        wait_for(lambda: ready(tmp_path, 2), what="2 workers ready")
        out = proc.stdout.readline().decode() + proc.stdout.readline().decode()
        assert f"web: HTTP on 127.0.0.1:{http_port} -> queue q (2 workers)" in out
        for n in range(6):
            request = urllib.request.Request(
                f"http://127.0.0.1:{http_port}/", data=f"Subject: m{n}\r\n\r\ntoken-{n}\r\n"
                .encode(), method="POST", headers={
                    "Content-Type": "message/rfc822",
                    "X-Envelope-Sender": base64.b64encode(b"a@example.net").decode(),
                    "X-Envelope-Recipient": base64.b64encode(b"b@example.org").decode()})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        wait_for(lambda: len(maildir_tokens(tmp_path)) == 6, what="6 messages delivered")
        assert stop(proc) == 0
    finally:
        proc.kill()
    assert "Traceback" not in log_text(tmp_path)
