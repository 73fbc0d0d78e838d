"""slimta.app.config and slimta.app.yamlload: the sample loads, broken configs say where and why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from slimta.app.config import (
    MASK,
    Config,
    ConfigError,
    MemoryQueueConfig,
    RetryExpression,
    SmtpEdgeConfig,
    SqliteQueueConfig,
    load_config,
    parse_config,
)
from slimta.app.yamlload import LineDict, load_yaml

COMPAT = Path("/work/shared/compat")
if not COMPAT.is_dir():
    COMPAT = Path(__file__).resolve().parents[3] / "shared" / "compat"

BASE = """\
edge:
  inbound:
    type: smtp
    queue: inbound
    listener: {interface: 127.0.0.1, port: 1025}
    rules:
      dnsbl: zen.spamhaus.org
queue:
  inbound:
    type: memory
    relay: out
    policies:
      - {type: add_date_header}
    retry:
      maximum: 3
      delay: 30*x
relay:
  out:
    type: blackhole
"""


@pytest.fixture
def here(tmp_path, monkeypatch):
    """Work in tmp_path, so messages name files as the user typed them."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(text: str, name: str = "slimta.yaml") -> str:
    write(Path(name), text)
    with pytest.raises(ConfigError) as info:
        load_config(name)
    return str(info.value)


def changed(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


# --- the original's sample ------------------------------------------------------

@pytest.mark.skipif(not (COMPAT / "slimta.yaml.sample").exists(), reason="no compat sample")
def test_original_sample_loads_unchanged(here):
    for name in ("slimta.yaml.sample", "logging.yaml.sample"):
        shutil.copy(COMPAT / name, here / name)
    config = load_config("slimta.yaml.sample")

    assert set(config.edge) == {"inbound", "outbound"}
    inbound = config.edge["inbound"]
    assert isinstance(inbound, SmtpEdgeConfig)
    assert inbound.queue == "inbound"
    assert [(lst.interface, lst.port) for lst in inbound.listener] == [("127.0.0.1", 1025)]
    assert inbound.rules.banner == "{fqdn} ESMTP Mail Delivery Agent"
    assert inbound.rules.dnsbl == ["zen.spamhaus.org"]
    assert inbound.rules.only_recipients == ["postmaster@example.com", "abuse@example.com"]
    creds = config.edge["outbound"].rules.lookup_credentials
    assert creds.type == "config"
    assert creds.map == {"user@example.com": {"password": "abcd1234"}}

    outbound = config.queue["outbound"]
    assert isinstance(outbound, MemoryQueueConfig)
    assert [p.type for p in outbound.policies] == [
        "add_date_header", "add_messageid_header", "add_received_header",
        "recipient_domain_split"]
    assert outbound.retry.maximum == 3
    assert outbound.retry.delay(2) == 60.0
    assert config.queue["inbound"].retry is None
    assert {r.type for r in config.relay.values()} == {"blackhole"}

    process = config.process["slimta"]
    assert process.daemon is False
    assert process.logging["version"] == 1
    assert process.logging["handlers"]["console"]["stream"] == "ext://sys.stdout"
    assert process.logging["root"]["handlers"] == ["console"]


def test_base_config_loads(here):
    write(here / "slimta.yaml", BASE)
    config = load_config("slimta.yaml")
    assert config.path == "slimta.yaml"
    assert config.process_settings().shutdown_timeout == 30.0  # no process entry: defaults
    assert config.queue["inbound"].relay == "out"
    assert config.edge["inbound"].max_size == 10 * 1024 * 1024  # SmtpEdge's default


# --- broken configs ----------------------------------------------------------------

BROKEN = {
    "unknown key": (
        changed("    rules:", "    hostnme: mx.example.com\n    rules:"),
        "slimta.yaml:6: edge.inbound.hostnme: unknown key (did you mean 'hostname'?)"),
    "edge names a missing queue": (
        changed("queue: inbound", "queue: inbund"),
        "slimta.yaml:4: edge.inbound.queue: no queue named 'inbund' (inbound)"),
    "queue names a missing relay": (
        changed("relay: out", "relay: nowhere"),
        "slimta.yaml:11: queue.inbound.relay: no relay named 'nowhere' (out)"),
    "bounce_queue names a missing queue": (
        changed("    relay: out", "    relay: out\n    bounce_queue: bounces"),
        "slimta.yaml:12: queue.inbound.bounce_queue: no queue named 'bounces' (inbound)"),
    "dnsbl of the wrong type": (
        changed("dnsbl: zen.spamhaus.org", "dnsbl: {zen: 1}"),
        "slimta.yaml:7: edge.inbound.rules.dnsbl: expected a string or list of strings"),
    "port not a number": (
        changed("port: 1025", "port: smtp"),
        "slimta.yaml:5: edge.inbound.listener.port: expected an integer"),
    "unknown policy type": (
        changed("add_date_header", "add_data_header"),
        "slimta.yaml:13: queue.inbound.policies[0].type: unknown policy type "
        "'add_data_header' (expected one of: add_date_header, add_messageid_header, "
        "add_received_header, recipient_split, recipient_domain_split, forward, spamassassin, "
        "lookup, dkim_sign, dkim_verify, add_authentication_results, arc_seal, custom)"),
    "unknown relay type": (
        changed("type: blackhole", "type: smtp"),
        "slimta.yaml:19: relay.out.type: unknown relay type 'smtp' (expected one of: mx, "
        "static, lmtp, pipe, maildrop, dovecot, maildir, blackhole, http, custom)"),
    "retry delay that calls a function": (
        changed("30*x", "__import__('os')"),
        "slimta.yaml:16: queue.inbound.retry.delay: invalid expression \"__import__('os')\": "
        "only numbers, x, + - * / ** and parentheses are allowed"),
    "retry delay dividing by zero": (
        changed("30*x", "30/(x-1)"),
        "slimta.yaml:16: queue.inbound.retry.delay: '30/(x-1)' with x=1: float division by zero"),
    "edge without its queue": (
        changed("    queue: inbound\n", ""),
        "slimta.yaml:2: edge.inbound.queue: required key missing"),
    "edge without a type": (
        changed("    type: smtp\n", ""),
        "slimta.yaml:2: edge.inbound.type: required key missing"),
    "a redis queue key misspelt": (
        changed("type: memory", "type: redis\n    prefx: 'mail:'"),
        "slimta.yaml:11: queue.inbound.prefx: unknown key (did you mean 'prefix'?)"),
    "a postgres schema that is not an identifier": (
        changed("type: memory", "type: postgres\n    schema: 'a; drop'"),
        "slimta.yaml:11: queue.inbound.schema: string should match pattern "
        "'^[A-Za-z_][A-Za-z0-9_]*$'"),
    "a policy that is not a mapping": (
        changed("- {type: add_date_header}", "- add_date_header"),
        "slimta.yaml:13: queue.inbound.policies[0]: expected a mapping"),
    "tls_immediately without tls": (
        changed("    rules:", "    tls_immediately: true\n    rules:"),
        "slimta.yaml:6: edge.inbound.tls_immediately: tls_immediately needs tls "
        "{certfile, keyfile}"),
    "both retry forms": (
        changed("delay: 30*x", "delay: 30*x\n      initial: 60"),
        "slimta.yaml:17: queue.inbound.retry.initial: give either delay or initial/max/jitter, "
        "not both"),
    "a missing named lookup": (
        changed("dnsbl: zen.spamhaus.org", "lookup_senders: senders"),
        "slimta.yaml:7: edge.inbound.rules.lookup_senders: no lookup named 'senders' "
        "(none defined)"),
    "an inline lookup with an unknown key": (
        changed("dnsbl: zen.spamhaus.org", "lookup_senders: {type: config, mapping: {}}"),
        "slimta.yaml:7: edge.inbound.rules.lookup_senders.mapping: unknown key"),
    "an unknown SPF result": (
        changed("dnsbl: zen.spamhaus.org", "reject_spf: [fail, fial]"),
        "slimta.yaml:7: edge.inbound.rules.reject_spf[1]: expected 'fail', 'softfail', "
        "'neutral', 'none', 'permerror' or 'temperror'"),
    "a bad regular expression": (
        changed("dnsbl: zen.spamhaus.org", "regex_senders:\n        - '^ok$'\n        - '(a'"),
        "slimta.yaml:9: edge.inbound.rules.regex_senders[1]: invalid regular expression: "
        "missing ), unterminated subpattern at position 0"),
    "a factory that is not module:callable": (
        changed("type: blackhole", "type: custom\n    factory: mymodule"),
        "slimta.yaml:20: relay.out.factory: expected 'module:callable', e.g. "
        "'mypackage.edges:build'"),
    "a negative limit": (
        changed("    rules:", "    max_connections: 0\n    rules:"),
        "slimta.yaml:6: edge.inbound.max_connections: expected a value >= 1"),
    "a key given twice": (
        changed("    type: memory\n", "    type: memory\n    type: sqlite\n"),
        "slimta.yaml:11: key 'type' given twice (first on line 10)"),
    "YAML syntax": (
        changed("    type: blackhole", "    type: [blackhole"),
        "slimta.yaml:20: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence)"),
    "a Python object tag": (
        changed("type: blackhole", "type: !!python/object/apply:os.system [true]"),
        "slimta.yaml:19: could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'"),
    "a misspelt policy option": (
        changed("- {type: add_date_header}", "- {type: add_date_header, local_time: true}"),
        "slimta.yaml:13: queue.inbound.policies[0].local_time: unknown key "
        "(did you mean 'localtime'?)"),
    "a key nothing resembles": (
        changed("    type: blackhole", "    type: blackhole\n    colour: red"),
        "slimta.yaml:20: relay.out.colour: unknown key"),
    "proxyprotocol version": (
        changed("    rules:", "    proxyprotocol: v3\n    rules:"),
        "slimta.yaml:6: edge.inbound.proxyprotocol: expected false, true, 'v1', 'v2' or 'any'"),
    "not a mapping at the top": (
        "- edge\n- queue\n",
        "slimta.yaml:1: expected a mapping of sections at the top level"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_config(here, name):
    text, expected = BROKEN[name]
    assert error_of(text) == expected


def test_every_problem_is_reported_in_file_order(here):
    text = changed("port: 1025", "port: smtp").replace("type: blackhole", "type: nothing")
    assert error_of(text).splitlines() == [
        "slimta.yaml:5: edge.inbound.listener.port: expected an integer",
        "slimta.yaml:19: relay.out.type: unknown relay type 'nothing' (expected one of: mx, "
        "static, lmtp, pipe, maildrop, dovecot, maildir, blackhole, http, custom)",
    ]


def test_an_http_edge_names_a_missing_credentials_lookup(here):
    text = ("edge:\n  web:\n    type: http\n    queue: q\n    auth:\n"
            "      lookup_credentials: users\nqueue:\n  q: {type: memory}\n")
    assert error_of(text) == (
        "slimta.yaml:6: edge.web.auth.lookup_credentials: no lookup named 'users' "
        "(none defined)")


def test_error_keeps_its_problems(here):
    write(here / "slimta.yaml", changed("queue: inbound", "queue: other"))
    with pytest.raises(ConfigError) as info:
        load_config("slimta.yaml")
    [problem] = info.value.problems
    assert (problem.mark.file, problem.mark.line) == ("slimta.yaml", 4)
    assert problem.path == "edge.inbound.queue"


# --- !include and !env -------------------------------------------------------------

def test_include_is_relative_to_the_including_file(here):
    write(here / "conf/slimta.yaml", "relay: !include parts/relays.yaml\n")
    write(here / "conf/parts/relays.yaml", "out: !include ../out.yaml\n")
    write(here / "conf/out.yaml", "type: maildir\npath: /var/mail/{localpart}\n")
    config = load_config("conf/slimta.yaml")
    assert config.relay["out"].path == "/var/mail/{localpart}"


def test_errors_in_an_included_file_name_that_file(here):
    write(here / "slimta.yaml", "relay: !include relays.yaml\n")
    write(here / "relays.yaml", "out:\n  type: blackhole\n  colour: red\n")
    assert error_of("relay: !include relays.yaml\n") == (
        "relays.yaml:3: relay.out.colour: unknown key")


def test_include_cycle(here):
    write(here / "a.yaml", "queue: !include b.yaml\n")
    write(here / "b.yaml", "q: !include a.yaml\n")
    assert error_of("edge: {}\nqueue: !include a.yaml\n") == (
        "b.yaml:1: !include a.yaml: include cycle: a.yaml -> b.yaml -> a.yaml")


def test_include_of_itself(here):
    assert error_of("queue: !include slimta.yaml\n") == (
        "slimta.yaml:1: !include slimta.yaml: include cycle: slimta.yaml -> slimta.yaml")


def test_missing_include(here):
    assert error_of("process:\n  slimta:\n    logging: !include logging.yaml\n") == (
        "slimta.yaml:3: !include logging.yaml: no such file or directory")


def test_missing_config_file(here):
    with pytest.raises(ConfigError) as info:
        load_config("nowhere.yaml")
    assert str(info.value) == "nowhere.yaml: no such file or directory"


def test_env_with_value_and_default(here, monkeypatch):
    monkeypatch.setenv("SLIMTA_TEST_PORT", "2525")
    monkeypatch.delenv("SLIMTA_TEST_HOST", raising=False)
    text = changed("listener: {interface: 127.0.0.1, port: 1025}",
                   "listener: {interface: !env 'SLIMTA_TEST_HOST:::1', "
                   "port: !env SLIMTA_TEST_PORT}")
    write(here / "slimta.yaml", text)
    [listener] = load_config("slimta.yaml").edge["inbound"].listener
    assert (listener.interface, listener.port) == ("::1", 2525)


def test_env_without_default(here, monkeypatch):
    monkeypatch.delenv("SLIMTA_TEST_PASSWORD", raising=False)
    text = "relay:\n  out:\n    type: static\n    host: smtp.example.com\n" \
           "    credentials: {username: me, password: !env SLIMTA_TEST_PASSWORD}\n"
    assert error_of(text) == (
        "slimta.yaml:5: !env SLIMTA_TEST_PASSWORD: not set, and no default "
        "(!env SLIMTA_TEST_PASSWORD:default)")


def test_anchors_aliases_and_merge_keys(here):
    text = """\
relay:
  out: {type: blackhole}
queue:
  a: &q
    type: memory
    relay: out
    policies: &headers
      - {type: add_date_header}
      - {type: add_received_header}
  b:
    <<: *q
    type: sqlite
    path: /var/spool/slimta/b.db
    policies: *headers
"""
    write(here / "slimta.yaml", text)
    config = load_config("slimta.yaml")
    b = config.queue["b"]
    assert isinstance(b, SqliteQueueConfig)
    assert (b.relay, b.path) == ("out", "/var/spool/slimta/b.db")
    assert [p.type for p in b.policies] == ["add_date_header", "add_received_header"]


def test_lines_of_keys_and_items(here):
    write(here / "slimta.yaml", BASE)
    data = load_yaml("slimta.yaml")
    assert isinstance(data, LineDict)
    assert data.key_marks["queue"].line == 8
    assert str(data["queue"]["inbound"].key_marks["retry"]) == "slimta.yaml:14"
    assert data["queue"]["inbound"]["policies"].item_marks[0].line == 13


# --- schema details ------------------------------------------------------------------

def test_listener_forms_and_default_queue_type():
    config = parse_config({
        "edge": {"in": {"type": "smtp", "queue": "q",
                        "listener": ["127.0.0.1:25", "[::1]:25", {"port": 2525}]}},
        "queue": {"q": {}},
    })
    assert [(lst.interface, lst.port) for lst in config.edge["in"].listener] == [
        ("127.0.0.1", 25), ("::1", 25), ("", 2525)]
    assert isinstance(config.queue["q"], SqliteQueueConfig)
    assert config.queue["q"].type == "sqlite"


def test_keys_written_empty_mean_none(here):
    write(here / "slimta.yaml", "process:\n  slimta:\nlookup:\nrelay:\n  out: {type: blackhole}\n"
          "queue:\n  q:\n    relay: out\n    policies:\n")
    config = load_config("slimta.yaml")
    assert config.lookup == {}
    assert config.queue["q"].policies == []
    assert config.process_settings().log_format == "text"


def test_empty_config_is_valid():
    assert parse_config(None) == Config()


def test_logging_needs_a_dictconfig_version():
    with pytest.raises(ConfigError) as info:
        parse_config({"process": {"slimta": {"logging": {"root": {"level": "INFO"}}}}})
    assert str(info.value) == (
        "process.slimta.logging: a logging.config.dictConfig mapping needs 'version: 1'")


def test_reject_spam_forms():
    def rule(value):
        config = parse_config({"queue": {"q": {}}, "edge": {"e": {
            "type": "smtp", "queue": "q", "rules": {"reject_spam": value}}}})
        return config.edge["e"].rules.reject_spam

    assert rule(True).host == "127.0.0.1" and rule(True).port == 783
    assert rule(False) is None
    spam = rule({"type": "spamassassin", "host": "spamd", "reject_above": 8})
    assert (spam.host, spam.reject_above) == ("spamd", 8.0)


def test_relay_accepts_the_originals_concurrent_connections():
    config = parse_config({"relay": {"mx": {"type": "mx", "concurrent_connections": 5}}})
    assert config.relay["mx"].pool_size == 5


def test_lookup_policy_names_a_lookup():
    config = parse_config({
        "lookup": {"aliases": {"type": "config", "map": {"a@example.com": {"alias": "b"}}}},
        "relay": {"out": {"type": "blackhole"}},
        "queue": {"q": {"relay": "out", "policies": [{"type": "lookup", "lookup": "aliases"}]}},
    })
    assert config.queue["q"].policies[0].lookup == "aliases"
    with pytest.raises(ConfigError) as info:
        parse_config({"queue": {"q": {"policies": [{"type": "lookup", "lookup": "nope"}]}}})
    assert str(info.value) == "queue.q.policies[0].lookup: no lookup named 'nope' (none defined)"


# --- retry expressions -----------------------------------------------------------------

@pytest.mark.parametrize(("source", "x", "value"), [
    ("30*x", 3, 90.0),
    ("300*2**(x-1)", 3, 1200.0),
    ("300", 7, 300.0),
    ("-x + 100", 10, 90.0),
    ("(x + 1) * 2.5", 1, 5.0),
    ("x / 4", 2, 0.5),
    ("+x", 4, 4.0),
])
def test_retry_expression_values(source, x, value):
    assert RetryExpression(source)(x) == value


@pytest.mark.parametrize("source", [
    "__import__('os')", "abs(x)", "x.real", "y", "[x]", "x if x else 1", "x < 3",
    "x // 2", "x % 2", "'30' * x", "True", "lambda: 1", "x; x", "", "30*",
    "(" * 150 + "x" + ")" * 150,
])
def test_retry_expression_refusals(source):
    with pytest.raises(ValueError, match="expression"):
        RetryExpression(source)


@pytest.mark.parametrize(("source", "x"), [("1/(x-2)", 2), ("10**10**10", 1), ("x - 5", 1),
                                           ("1e400", 1)])
def test_retry_expression_results_that_are_not_delays(source, x):
    with pytest.raises(ValueError):
        RetryExpression(source)(x)


# --- masking ---------------------------------------------------------------------------

SECRETS = {
    "process": {"slimta": {"admin": {"token": "admintoken"}, "logging": {
        "version": 1, "handlers": {"mail": {
            "class": "logging.handlers.SMTPHandler", "mailhost": "localhost",
            "fromaddr": "a@example.com", "toaddrs": ["b@example.com"], "subject": "log",
            "credentials": ["loguser", "logsecret"]}}}}},
    "edge": {"sub": {"type": "smtp", "queue": "q", "rules": {
        "lookup_credentials": {"type": "config",
                               "map": {"user@example.com": {"password": "abcd1234"}}}}}},
    "queue": {"q": {"relay": "smarthost", "policies": [{
        "type": "dkim_sign",
        "keys": {"example.com": {"selector": "s1", "key": "-----BEGIN PRIVATE KEY-----"}}}]}},
    "relay": {"smarthost": {"type": "static", "host": "smtp.example.com",
                            "credentials": {"username": "me", "password": "hunter2"}}},
    "lookup": {"users": {"type": "sql", "query": "SELECT 1",
                         "database": "postgresql://slimta:dbsecret@db.example.com/mail"}},
}


def test_masked_hides_secrets():
    config = parse_config(SECRETS)
    masked = config.masked()
    text = config.dump_masked()
    for secret in ("admintoken", "loguser", "logsecret", "abcd1234", "BEGIN PRIVATE", "hunter2",
                   "dbsecret"):
        assert secret not in text
    assert masked["process"]["slimta"]["admin"]["token"] == MASK
    assert masked["relay"]["smarthost"]["credentials"] == {"username": "me", "password": MASK}
    assert masked["queue"]["q"]["policies"][0]["keys"]["example.com"]["key"] == MASK
    assert masked["lookup"]["users"]["database"] == (
        f"postgresql://slimta:{MASK}@db.example.com/mail")
    assert masked["lookup"]["users"]["key_template"] is None
    assert masked["edge"]["sub"]["rules"]["lookup_credentials"]["map"] == {
        "user@example.com": {"password": MASK}}
    # the resolved config: defaults filled in, and YAML that loads again
    assert yaml.safe_load(text) == masked
    assert masked["queue"]["q"]["type"] == "sqlite"
    assert next(iter(masked["queue"]["q"])) == "type"
    # the config itself keeps the secrets
    assert config.relay["smarthost"].credentials.password == "hunter2"
