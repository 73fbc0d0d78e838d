"""`slimta check -c FILE` as a subprocess: broken configs say where and why; a good one prints
the resolved config with its secrets masked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the same config as tests/app/test_config.py, so the line numbers match its messages
from test_config import BASE

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
ENV.pop("SLIMTA_TEST_PASSWORD", None)



def changed(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


def check(tmp_path: Path, files: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return subprocess.run([*CLI, "check", "-c", "slimta.yaml"], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(ENV, **env), timeout=60)


BROKEN: dict[str, tuple[dict[str, str], str]] = {
    "unknown key": (
        {"slimta.yaml": changed("    rules:", "    hostnme: mx.example.com\n    rules:")},
        "slimta.yaml:6: edge.inbound.hostnme: unknown key (did you mean 'hostname'?)"),
    "bad queue reference": (
        {"slimta.yaml": changed("queue: inbound", "queue: inbund")},
        "slimta.yaml:4: edge.inbound.queue: no queue named 'inbund' (inbound)"),
    "bad relay reference": (
        {"slimta.yaml": changed("relay: out", "relay: nowhere")},
        "slimta.yaml:11: queue.inbound.relay: no relay named 'nowhere' (out)"),
    "wrong type": (
        {"slimta.yaml": changed("dnsbl: zen.spamhaus.org", "dnsbl: {zen: 1}")},
        "slimta.yaml:7: edge.inbound.rules.dnsbl: expected a string or list of strings"),
    "port not a number": (
        {"slimta.yaml": changed("port: 1025", "port: smtp")},
        "slimta.yaml:5: edge.inbound.listener.port: expected an integer"),
    "unknown policy type": (
        {"slimta.yaml": changed("add_date_header", "add_data_header")},
        "slimta.yaml:13: queue.inbound.policies[0].type: unknown policy type "
        "'add_data_header' (expected one of: add_date_header, add_messageid_header, "
        "add_received_header, recipient_split, recipient_domain_split, forward, spamassassin, "
        "lookup, dkim_sign, dkim_verify, add_authentication_results, arc_seal, custom)"),
    "unknown relay type": (
        {"slimta.yaml": changed("type: blackhole", "type: smtp")},
        "slimta.yaml:19: relay.out.type: unknown relay type 'smtp' (expected one of: mx, "
        "static, lmtp, pipe, maildrop, dovecot, maildir, blackhole, http, custom)"),
    "bad retry expression": (
        {"slimta.yaml": changed("30*x", "__import__('os')")},
        "slimta.yaml:16: queue.inbound.retry.delay: invalid expression \"__import__('os')\": "
        "only numbers, x, + - * / ** and parentheses are allowed"),
    "retry expression dividing by zero": (
        {"slimta.yaml": changed("30*x", "30/(x-1)")},
        "slimta.yaml:16: queue.inbound.retry.delay: '30/(x-1)' with x=1: float division by zero"),
    "required key missing": (
        {"slimta.yaml": changed("    queue: inbound\n", "")},
        "slimta.yaml:2: edge.inbound.queue: required key missing"),
    "include cycle": (
        {"slimta.yaml": "edge: {}\nqueue: !include a.yaml\n",
         "a.yaml": "queue: !include b.yaml\n", "b.yaml": "q: !include a.yaml\n"},
        "b.yaml:1: !include a.yaml: include cycle: a.yaml -> b.yaml -> a.yaml"),
    "missing include": (
        {"slimta.yaml": "process:\n  slimta:\n    logging: !include logging.yaml\n"},
        "slimta.yaml:3: !include logging.yaml: no such file or directory"),
    "missing !env": (
        {"slimta.yaml": "relay:\n  out:\n    type: static\n    host: smtp.example.com\n"
                        "    credentials: {username: me, password: !env SLIMTA_TEST_PASSWORD}\n"},
        "slimta.yaml:5: !env SLIMTA_TEST_PASSWORD: not set, and no default "
        "(!env SLIMTA_TEST_PASSWORD:default)"),
    "key given twice": (
        {"slimta.yaml": changed("    type: memory\n", "    type: memory\n    type: sqlite\n")},
        "slimta.yaml:11: key 'type' given twice (first on line 10)"),
    "YAML syntax": (
        {"slimta.yaml": changed("    type: blackhole", "    type: [blackhole")},
        "slimta.yaml:20: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)"),
    "Python object tag": (
        {"slimta.yaml": changed("type: blackhole",
                                "type: !!python/object/apply:os.system [true]")},
        "slimta.yaml:19: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'"),
    "error in an included file": (
        {"slimta.yaml": "relay: !include relays.yaml\n",
         "relays.yaml": "out:\n  type: blackhole\n  colour: red\n"},
        "relays.yaml:3: relay.out.colour: unknown key"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_config(tmp_path, name):
    files, expected = BROKEN[name]
    out = check(tmp_path, files)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.splitlines()
    assert lines[:2] == ["slimta: invalid config:", expected]
    assert out.stdout == ""
    assert "Traceback" not in out.stderr


def test_every_problem_is_listed(tmp_path):
    text = changed("port: 1025", "port: smtp").replace("type: blackhole", "type: nothing")
    out = check(tmp_path, {"slimta.yaml": text})
    assert out.returncode == 1
    assert out.stderr.splitlines()[1:] == [
        "slimta.yaml:5: edge.inbound.listener.port: expected an integer",
        "slimta.yaml:19: relay.out.type: unknown relay type 'nothing' (expected one of: mx, "
        "static, lmtp, pipe, maildrop, dovecot, maildir, blackhole, http, custom)",
    ]


GOOD = """\
process:
  slimta:
    admin: {listener: '127.0.0.1:8025', token: admin-token-xyz}
edge:
  in: {type: smtp, queue: q, listener: '127.0.0.1:2525'}
queue:
  q: {type: memory, relay: out, retry: {maximum: 3, delay: 30*x}}
relay:
  out:
    type: static
    host: smarthost.test
    credentials: {username: me, password: !env SLIMTA_TEST_PASSWORD}
"""


def test_good_config_prints_it_resolved_with_secrets_masked(tmp_path):
    out = check(tmp_path, {"slimta.yaml": GOOD}, SLIMTA_TEST_PASSWORD="hunter2-from-env")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip() == "slimta: slimta.yaml: OK"
    assert "hunter2-from-env" not in out.stdout and "admin-token-xyz" not in out.stdout
    assert out.stdout.count("********") >= 2
    assert "smarthost.test" in out.stdout and "username: me" in out.stdout
    assert "max_size: 10485760" in out.stdout  # defaults are filled in
