"""`slimta queue --config FILE`: the storage of a config's queue, shared ones while daemons run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_queue_cli import CLI, ENV, build_queue
from test_serve import connect, free_port

from slimta.edge.smtp import SmtpEdge


def queue_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "queue", "--config", str(config), *args], capture_output=True,
                          text=True, env=ENV, timeout=60)


def listed(config: Path) -> list[dict]:
    out = queue_cli(config, "list", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


async def test_a_sqlite_queue_of_a_config(tmp_path):
    ids = await build_queue(tmp_path / "data" / "inbound.db")
    config = tmp_path / "slimta.yaml"
    config.write_text("process: {slimta: {data_dir: data}}\n"
                      "queue: {inbound: {type: sqlite}}\n")
    assert {m["id"] for m in listed(config)} == set(ids.values())
    out = queue_cli(config, "delete", ids["fresh"], "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"done": [ids["fresh"]], "missing": []}
    assert len(listed(config)) == 2


@pytest.mark.parametrize(("text", "code", "message"), [
    ("queue: {a: {type: memory}, b: {type: memory}}\n", 2, "pick one with --queue NAME"),
    ("queue: {a: {type: memory}}\n", 2, "queue 'a' is of type 'memory'"),
    ("queue: {a: {type: sqlite}}\n", 2, "no queue file at"),
])
def test_config_queues_that_cannot_be_reached(tmp_path, text, code, message):
    config = tmp_path / "slimta.yaml"
    config.write_text(text)
    out = queue_cli(config, "list")
    assert out.returncode == code
    assert message in out.stderr


def test_no_such_queue_and_conflicting_options(tmp_path):
    config = tmp_path / "slimta.yaml"
    config.write_text("queue: {a: {type: memory}}\n")
    out = queue_cli(config, "--queue", "nope", "list")
    assert out.returncode == 2 and "no queue named 'nope' (there are: a)" in out.stderr
    out = subprocess.run([*CLI, "queue", "--config", str(config), "--db", "x.db", "list"],
                         capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2 and "--config goes without --db and --admin" in out.stderr


CONFIG = """
process:
  slimta: {{data_dir: data}}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{port}'}}
queue:
  q:
    {storage}
    relay: out
    retry: {{maximum: 5, delay: '3600'}}
relay:
  out: {{type: static, host: 127.0.0.1, port: {relay_port}, starttls: false}}
"""


def test_a_shared_queue_managed_while_its_daemon_runs(tmp_path, shared_queue_keys, run_edge):
    """list/hold/delete/release/flush on the shared storage; the daemon acts on them at once."""
    relay_port, port = free_port(), free_port()
    config = tmp_path / "slimta.yaml"
    config.write_text(CONFIG.format(port=port, storage=shared_queue_keys, relay_port=relay_port))
    err = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen([*CLI, "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=err, env=ENV, cwd=tmp_path)
    try:
        with connect(port, proc) as client:
            for n in range(3):
                client.sendmail("a@example.com", [f"r{n}@example.com"],
                                f"Subject: m{n}\r\n\r\nx\r\n".encode())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the first attempts fail: the relay port is closed
            entries = listed(config)
            if len(entries) == 3 and all(e["attempts"] == 1 for e in entries):
                break
            time.sleep(0.2)
        assert [e["attempts"] for e in entries] == [1, 1, 1]
        by_rcpt = {e["recipients"][0]: e["id"] for e in entries}
        assert queue_cli(config, "hold", by_rcpt["r0@example.com"]).returncode == 0
        assert queue_cli(config, "delete", by_rcpt["r1@example.com"]).returncode == 0
        stats = json.loads(queue_cli(config, "stats", "--json").stdout)
        assert stats["messages"] == 2 and stats["held"] == 1
        # the smarthost comes up: a flush makes the daemon deliver now, not in an hour
        sink = run_edge(edge_class=SmtpEdge, listener=("127.0.0.1", relay_port))
        assert queue_cli(config, "flush").returncode == 0
        deadline = time.monotonic() + 20
        while len(sink.queue.envelopes) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.recipients for e in sink.queue.envelopes] == [["r2@example.com"]]
        assert queue_cli(config, "release", by_rcpt["r0@example.com"]).returncode == 0
        deadline = time.monotonic() + 20
        while len(sink.queue.envelopes) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [e.recipients for e in sink.queue.envelopes][1] == ["r0@example.com"]
        assert listed(config) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            proc.kill()
    assert "Traceback" not in (tmp_path / "stderr.log").read_text()
