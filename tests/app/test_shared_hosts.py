"""Two `slimta serve` hosts on one shared queue (PostgreSQL, Redis); one is killed mid-delivery.

Both relay to one counting SmtpEdge (the sink, in this process). A parallel
client sends 2,000 messages split between the hosts, moving to the other host
when its own fails, as a client falls back to the next MX. Every message a host
acknowledged with 250 must reach the sink at least once; duplicates (the price
of at-least-once delivery after a crash) must stay under 1 %.
"""

from __future__ import annotations

import collections
import signal
import smtplib
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from test_serve import CLI, ENV, connect, free_port

from slimta.edge.smtp import SmtpEdge

MESSAGES = 2000
CLIENTS = 10
LEASE = 3

CONFIG = """
process:
  slimta: {{data_dir: data}}
edge:
  in: {{type: smtp, queue: q, listener: '127.0.0.1:{port}'}}
queue:
  q:
    {storage}
    relay: out
    lease: {lease}
    relay_pool: 5
    retry: {{maximum: 20, delay: '1'}}
relay:
  out: {{type: static, host: 127.0.0.1, port: {sink}, starttls: false}}
"""


def start_host(tmp_path: Path, name: str, storage: str, sink: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    home = tmp_path / name
    home.mkdir()
    config = home / "slimta.yaml"
    config.write_text(CONFIG.format(port=port, storage=storage, lease=LEASE, sink=sink))
    err = open(home / "stderr.log", "wb")  # noqa: SIM115 - closed when the process ends
    proc = subprocess.Popen([*CLI, "serve", "-c", str(config)], stdout=subprocess.DEVNULL,
                            stderr=err, env=ENV, cwd=home)
    connect(port, proc).quit()
    return proc, port


def subjects_of(envelopes) -> list[str]:
    return [env.headers["Subject"] for env in envelopes]


def test_two_hosts_share_a_queue_and_survive_a_kill(tmp_path, run_edge, shared_queue_keys):
    sink = run_edge(edge_class=SmtpEdge)
    sink.queue.delay = 0.002  # deliveries take a moment, so some are in flight at the kill
    hosts = [start_host(tmp_path, name, shared_queue_keys, sink.port) for name in ("a", "b")]
    (victim, _), (survivor, _) = hosts
    acknowledged: set[str] = set()
    lock = threading.Lock()

    def send_all(client_no: int) -> None:
        mine = range(client_no, MESSAGES, CLIENTS)
        turn = client_no % 2
        client = None
        for n in mine:
            subject = f"m{n}"
            body = f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody {n}\r\n".encode()
            for _ in range(10):
                try:
                    if client is None:
                        client = smtplib.SMTP("127.0.0.1", hosts[turn][1], timeout=20)
                    client.sendmail("a@example.com", ["b@example.com"], body)
                except (OSError, smtplib.SMTPException):
                    client = None
                    turn = 1 - turn  # the other host, as a client tries the next MX
                    continue
                with lock:
                    acknowledged.add(subject)
                break
            else:
                raise AssertionError(f"{subject}: neither host took it")
        if client is not None:
            client.quit()

    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(send_all, i) for i in range(CLIENTS)]
            deadline = time.monotonic() + 120
            while len(sink.queue.envelopes) < MESSAGES // 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            victim.send_signal(signal.SIGKILL)
            for future in futures:
                future.result()
        assert len(acknowledged) == MESSAGES
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = set(subjects_of(sink.queue.envelopes))
            if acknowledged <= got:
                break
            time.sleep(0.2)
        received = collections.Counter(subjects_of(sink.queue.envelopes))
        lost = acknowledged - set(received)
        duplicates = sum(count - 1 for count in received.values())
        kind = shared_queue_keys.split()[1]
        print(f"\n{kind}: {MESSAGES} acknowledged, {len(received)} received, "
              f"{duplicates} duplicates ({duplicates / MESSAGES:.2%}), {len(lost)} lost")
        assert not lost, f"{len(lost)} acknowledged messages never arrived: {sorted(lost)[:10]}"
        assert duplicates < MESSAGES / 100
        assert survivor.poll() is None
    finally:
        for proc, _ in hosts:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                finally:
                    proc.kill()
    assert "Traceback" not in (tmp_path / "b" / "stderr.log").read_text()
