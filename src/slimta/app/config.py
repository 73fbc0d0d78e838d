"""The slimta config: its schema (pydantic models), loading and validation.

The format is the original slimta application's YAML: top-level sections
``process``, ``edge``, ``queue``, ``relay`` and ``lookup``, each a mapping of
named entries that refer to each other by name (``edge.X.queue`` names a
queue, ``queue.Y.relay`` a relay, ``queue.Y.bounce_queue`` a queue, rules
and policies may name a lookup). :func:`load_config` reads a file (see
:mod:`slimta.app.yamlload` for ``!include`` and ``!env``) and returns a
:class:`Config`, or raises :class:`ConfigError` whose message names the file
line and key of each problem::

    slimta.yaml:14: edge.inbound.rules.dnsbl: expected a string or list of strings

Unknown keys and unknown ``type`` values are errors. Building the objects
(edges, queues, relays) from a :class:`Config` is :mod:`slimta.app.build`'s job.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import os
import re
from collections.abc import Callable
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from slimta.app.yamlload import ConfigError, LineDict, LineList, Mark, Problem, load_yaml

__all__ = [
    "MASK",
    "AddDateHeaderPolicy",
    "AddMessageIdHeaderPolicy",
    "AddReceivedHeaderPolicy",
    "AdminConfig",
    "ArcSealPolicy",
    "AuthResultsPolicy",
    "BlackholeRelayConfig",
    "ClientTls",
    "Config",
    "ConfigError",
    "ConfigLookup",
    "ConfigValueError",
    "Credentials",
    "CustomEdgeConfig",
    "CustomLookupConfig",
    "CustomPolicy",
    "CustomQueueConfig",
    "CustomRelayConfig",
    "DkimKeyConfig",
    "DkimSignPolicy",
    "DkimVerifyPolicy",
    "DovecotRelayConfig",
    "EdgeConfig",
    "EdgeRules",
    "ForwardPolicy",
    "HttpEdgeAuth",
    "HttpEdgeConfig",
    "HttpRelayConfig",
    "HttpUser",
    "Listener",
    "LmtpRelayConfig",
    "LookupConfig",
    "LookupPolicyConfig",
    "LookupRef",
    "MaildirRelayConfig",
    "MaildropRelayConfig",
    "MemoryQueueConfig",
    "MxRelayConfig",
    "PipeRelayConfig",
    "Policy",
    "ProcessConfig",
    "ProxyQueueConfig",
    "QueueConfig",
    "RecipientDomainSplitPolicy",
    "RecipientSplitPolicy",
    "RedisLookupConfig",
    "RegexLookupConfig",
    "RelayConfig",
    "RetryConfig",
    "RetryExpression",
    "ServerTls",
    "SmtpEdgeConfig",
    "SpamAssassinConfig",
    "SpamAssassinPolicy",
    "SpamRule",
    "SqlLookupConfig",
    "SqliteQueueConfig",
    "StaticRelayConfig",
    "load_config",
    "parse_config",
]

MASK = "********"


class ConfigValueError(ValueError):
    """A ValueError pointing below where it is raised: ``loc`` extends the error's path."""

    def __init__(self, message: str, *loc: str | int):
        super().__init__(message)
        self.loc = loc


# --- retry delay expressions --------------------------------------------------

_BINOPS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_EXPR_HELP = "only numbers, x, + - * / ** and parentheses are allowed"
_EXPR_MAX_LEN = 200


class RetryExpression:
    """A retry delay in seconds as an arithmetic expression of ``x``, the attempts so far.

    ``RetryExpression('30*x')(3) == 90.0``. The text is parsed with :mod:`ast`
    and only numbers, ``x``, ``+ - * / **`` and parentheses are accepted:
    it is evaluated by walking the tree, never with ``eval``. Arithmetic is
    in floats; a result that is not a finite number >= 0 raises ValueError.
    """

    def __init__(self, source: str):
        if not isinstance(source, str | int | float) or isinstance(source, bool):
            raise ValueError("expected an arithmetic expression of x")
        self.source = str(source).strip()
        if len(self.source) > _EXPR_MAX_LEN:
            raise ValueError(f"expression longer than {_EXPR_MAX_LEN} characters")
        try:
            tree = ast.parse(self.source, mode="eval")
        except SyntaxError:
            raise ValueError(f"invalid expression {self.source!r}: {_EXPR_HELP}") from None
        self._check(tree.body)
        self._tree = tree.body

    def _check(self, node: ast.AST) -> None:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            self._check(node.left)
            self._check(node.right)
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            self._check(node.operand)
        elif not ((isinstance(node, ast.Constant) and type(node.value) in (int, float))
                  or (isinstance(node, ast.Name) and node.id == "x")):
            raise ValueError(f"invalid expression {self.source!r}: {_EXPR_HELP}")

    def _eval(self, node: ast.AST, x: float) -> float:
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](self._eval(node.left, x), self._eval(node.right, x))
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](self._eval(node.operand, x))
        if isinstance(node, ast.Constant):
            return float(node.value)
        return float(x)

    def __call__(self, x: float) -> float:
        """The delay after ``x`` attempts, in seconds."""
        try:
            value = self._eval(self._tree, x)
        except (ZeroDivisionError, OverflowError) as exc:
            raise ValueError(f"{self.source!r} with x={x}: {exc}") from None
        if isinstance(value, complex) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{self.source!r} with x={x}: {value} is not a delay")
        return value

    def __repr__(self) -> str:
        return f"RetryExpression({self.source!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryExpression) and other.source == self.source

    def __hash__(self) -> int:
        return hash(self.source)


def _retry_expression(value: Any) -> RetryExpression:
    if isinstance(value, RetryExpression):
        return value
    expr = RetryExpression(value)
    expr(1)  # 1/0, 10**400: refused now, not at the first retry
    return expr


RetryDelay = Annotated[
    RetryExpression,
    PlainValidator(_retry_expression),
    PlainSerializer(lambda e: e.source, return_type=str),
]


# --- small types --------------------------------------------------------------

def _str_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigValueError("expected a string or list of strings")


StrList = Annotated[list[str], BeforeValidator(_str_list)]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _factory(value: Any) -> Any:
    if not isinstance(value, str) or not _FACTORY_RE.match(value):
        raise ConfigValueError("expected 'module:callable', e.g. 'mypackage.edges:build'")
    return value


Factory = Annotated[str, BeforeValidator(_factory)]


def _regexes(value: Any) -> Any:
    value = _str_list(value)
    for i, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigValueError(f"invalid regular expression: {exc}", i) from None
    return value


RegexList = Annotated[list[str], BeforeValidator(_regexes)]


def _one_of(*allowed: Any, lists: bool = False, text: bool = False,
            message: str) -> BeforeValidator:
    """A check before a small untagged union, so a bad value gets one clear message."""

    def check(value: Any) -> Any:
        if any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            return value
        if lists and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        if text and isinstance(value, str):
            return value
        raise ConfigValueError(message)

    return BeforeValidator(check)


def _empty(kind: type) -> Callable[[Any], Any]:
    """None (a key with nothing after it in YAML) as an empty ``kind``."""
    return lambda value: kind() if value is None else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _type_of(default: str | None = None) -> Callable[[Any], str | None]:
    """A discriminator: the entry's ``type`` (``default`` when it has none)."""

    def tag(value: Any) -> str | None:
        if isinstance(value, dict):
            found = value.get("type", default)
            return found if isinstance(found, str) else None
        return getattr(value, "type", None)

    return tag


# --- listeners and TLS --------------------------------------------------------

class Listener(_Model):
    """Where an edge listens: ``{interface, port}``; also written ``'host:port'``.

    ``interface`` ``''`` (the default) listens on every address, IPv6 and IPv4.
    """

    interface: str = ""
    port: int = Field(25, ge=0, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return {"port": value}
        if not isinstance(value, str):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigValueError(f"expected 'host:port' or {{interface, port}}, not {value!r}")
        return {"interface": host.strip("[]"), "port": int(port)}


def _listeners(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


class ServerTls(_Model):
    """The certificate an edge presents (STARTTLS, or SMTPS with ``tls_immediately``)."""

    certfile: str
    keyfile: str | None = None


class ClientTls(_Model):
    """TLS for a relay's outgoing connections. Unverified unless ``verify`` is true."""

    verify: bool = False
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None


class Credentials(_Model):
    """``{username, password}`` for AUTH to the next hop."""

    username: str
    password: str


# --- lookups ------------------------------------------------------------------

class ConfigLookup(_Model):
    """A lookup table in the config: ``map`` of key (after ``key_template``) to record."""

    type: Literal["config"]
    map: dict[str, Any] = {}
    key_template: str = "{address}"


class RegexLookupConfig(_Model):
    """Regular expressions tried in order: ``rules`` maps pattern to record."""

    type: Literal["regex"]
    rules: dict[str, Any]
    key_template: str = "{address}"
    groups: bool = False

    @field_validator("rules")
    @classmethod
    def _compile(cls, rules: dict[str, Any]) -> dict[str, Any]:
        for pattern in rules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigValueError(f"invalid regular expression: {exc}", pattern) from None
        return rules


class SqlLookupConfig(_Model):
    """A parameterised query against SQLite (a file name) or PostgreSQL (a URL)."""

    type: Literal["sql", "sqlite3"]
    database: str
    query: str
    key_template: str | None = None
    postgres: bool | None = None
    min_size: int = Field(1, ge=0)
    max_size: int = Field(4, ge=1)
    timeout: float = Field(10.0, gt=0)


class RedisLookupConfig(_Model):
    """A Redis key per lookup: a JSON string or a hash."""

    type: Literal["redis"]
    url: str | None = None
    key_template: str = "{address}"
    kind: Literal["string-json", "hash"] = "string-json"
    timeout: float = Field(5.0, gt=0)


class CustomLookupConfig(_Model):
    """``factory`` (``module:callable``) is called with ``options`` and returns the lookup."""

    type: Literal["custom"]
    factory: Factory
    options: dict[str, Any] = {}


LookupConfig = Annotated[
    Annotated[ConfigLookup, Tag("config")]
    | Annotated[RegexLookupConfig, Tag("regex")]
    | Annotated[SqlLookupConfig, Tag("sql")]
    | Annotated[SqlLookupConfig, Tag("sqlite3")]
    | Annotated[RedisLookupConfig, Tag("redis")]
    | Annotated[CustomLookupConfig, Tag("custom")],
    Discriminator(_type_of()),
]


def _ref_or_lookup(value: Any) -> str | None:
    if isinstance(value, str):
        return "ref"
    return _type_of()(value)


#: a lookup: the name of an entry in the ``lookup`` section, or one written in place
LookupRef = Annotated[
    Annotated[str, Tag("ref")]
    | Annotated[ConfigLookup, Tag("config")]
    | Annotated[RegexLookupConfig, Tag("regex")]
    | Annotated[SqlLookupConfig, Tag("sql")]
    | Annotated[SqlLookupConfig, Tag("sqlite3")]
    | Annotated[RedisLookupConfig, Tag("redis")]
    | Annotated[CustomLookupConfig, Tag("custom")],
    Discriminator(_ref_or_lookup),
]


# --- policies -----------------------------------------------------------------

class AddDateHeaderPolicy(_Model):
    """``Date:`` if missing."""

    type: Literal["add_date_header"]
    localtime: bool = False


class AddMessageIdHeaderPolicy(_Model):
    """``Message-Id:`` if missing."""

    type: Literal["add_messageid_header"]
    hostname: str | None = None


class AddReceivedHeaderPolicy(_Model):
    """Prepends ``Received:``."""

    type: Literal["add_received_header"]
    hostname: str | None = None
    date_format: str | None = None
    localtime: bool = False


class RecipientSplitPolicy(_Model):
    """One envelope per recipient."""

    type: Literal["recipient_split"]


class RecipientDomainSplitPolicy(_Model):
    """One envelope per recipient domain."""

    type: Literal["recipient_domain_split"]


class ForwardPolicy(_Model):
    """Rewrites recipients: ``mapping`` of regular expression to replacement, in order."""

    type: Literal["forward"]
    mapping: dict[str, str] = {}

    @field_validator("mapping")
    @classmethod
    def _compile(cls, mapping: dict[str, str]) -> dict[str, str]:
        for pattern in mapping:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigValueError(f"invalid regular expression: {exc}", pattern) from None
        return mapping


class SpamAssassinConfig(_Model):
    """A spamd to ask: ``host``/``port``, or a Unix ``socket``."""

    type: Literal["spamassassin"] = "spamassassin"
    host: str = "127.0.0.1"
    port: int = Field(783, ge=1, le=65535)
    socket: str | None = None
    timeout: float = Field(30.0, gt=0)
    max_size: int | None = Field(500 * 1024, ge=0)
    user: str | None = None
    fail_open: bool = True


class SpamRule(SpamAssassinConfig):
    """``reject_spam``: refuse at end of data what spamd calls spam (or scores above
    ``reject_above``); ``true`` means a local spamd with its own threshold."""

    reject_above: float | None = None


class SpamAssassinPolicy(SpamAssassinConfig):
    """Adds ``X-Spam-Status``/``-Score``/``-Symbols`` from spamd."""

    type: Literal["spamassassin"]


class LookupPolicyConfig(_Model):
    """Rewrites aliases, applies VERP and adds headers from a looked-up record."""

    type: Literal["lookup"]
    lookup: LookupRef
    on_sender: bool = False
    on_recipients: bool = True
    verp: Annotated[str | bool | None, _one_of(
        True, False, None, text=True, message="expected true, false or a VERP template")] = None
    alias_field: str = "alias"
    verp_field: str = "verp"
    headers_field: str = "add_headers"
    verp_separator: str = "+"


class DkimKeyConfig(_Model):
    """One signing domain's key: PEM text in ``key`` or a file in ``key_file``."""

    selector: str
    key: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> DkimKeyConfig:
        if (self.key is None) == (self.key_file is None):
            raise ConfigValueError("give exactly one of key and key_file")
        return self


class DkimSignPolicy(_Model):
    """DKIM signing; ``keys`` maps a domain (``*.example.com`` works) to its key."""

    type: Literal["dkim_sign"]
    keys: dict[str, DkimKeyConfig]
    headers: list[str] | None = None
    by: Literal["from", "envelope"] = "from"
    seven_bit: bool = False


class DkimVerifyPolicy(_Model):
    """Checks DKIM signatures and records the results."""

    type: Literal["dkim_verify"]
    minkey: int = Field(1024, ge=512)
    max_signatures: int = Field(5, ge=1)
    allow_sha1: bool = False
    arc: bool = True


class AuthResultsPolicy(_Model):
    """Adds ``Authentication-Results:`` (SPF, DKIM, DMARC)."""

    type: Literal["add_authentication_results"]
    authserv_id: str | None = None
    dmarc: bool = True
    forged: Literal["remove", "rename"] = "remove"


class ArcSealPolicy(_Model):
    """Seals forwarded mail (ARC)."""

    type: Literal["arc_seal"]
    selector: str
    domain: str
    key: str | None = None
    key_file: str | None = None
    authserv_id: str | None = None
    headers: list[str] | None = None


class CustomPolicy(_Model):
    """``factory`` (``module:callable``) is called with ``options`` and returns the policy."""

    type: Literal["custom"]
    factory: Factory
    options: dict[str, Any] = {}


Policy = Annotated[
    Annotated[AddDateHeaderPolicy, Tag("add_date_header")]
    | Annotated[AddMessageIdHeaderPolicy, Tag("add_messageid_header")]
    | Annotated[AddReceivedHeaderPolicy, Tag("add_received_header")]
    | Annotated[RecipientSplitPolicy, Tag("recipient_split")]
    | Annotated[RecipientDomainSplitPolicy, Tag("recipient_domain_split")]
    | Annotated[ForwardPolicy, Tag("forward")]
    | Annotated[SpamAssassinPolicy, Tag("spamassassin")]
    | Annotated[LookupPolicyConfig, Tag("lookup")]
    | Annotated[DkimSignPolicy, Tag("dkim_sign")]
    | Annotated[DkimVerifyPolicy, Tag("dkim_verify")]
    | Annotated[AuthResultsPolicy, Tag("add_authentication_results")]
    | Annotated[ArcSealPolicy, Tag("arc_seal")]
    | Annotated[CustomPolicy, Tag("custom")],
    Discriminator(_type_of()),
]


Policies = Annotated[list[Policy], BeforeValidator(_empty(list))]


# --- edges --------------------------------------------------------------------

SpfResult = Literal["fail", "softfail", "neutral", "none", "permerror", "temperror"]


def _spam_rule(value: Any) -> Any:
    if value is True:
        return {}
    if value is False:
        return None
    return value


class EdgeRules(_Model):
    """What an SMTP edge accepts, without writing validators.

    ``only_senders``/``only_recipients`` are addresses, or ``@domain`` for a
    whole domain; ``regex_*`` are regular expressions (any may match);
    ``reject_spf`` lists the SPF results refused at MAIL; ``dnsbl`` the
    blocklists asked at connect.
    ``lookup_*`` name an entry of the ``lookup`` section or give one in place
    (``{type: config, map: {...}}``); with ``lookup_credentials``, AUTH is
    offered and a sender must have logged in.
    """

    banner: str | None = None
    dnsbl: StrList | None = None
    reject_spf: Annotated[list[SpfResult], BeforeValidator(_str_list)] | None = None
    only_senders: StrList | None = None
    only_recipients: StrList | None = None
    regex_senders: RegexList | None = None
    regex_recipients: RegexList | None = None
    lookup_senders: LookupRef | None = None
    lookup_recipients: LookupRef | None = None
    lookup_credentials: LookupRef | None = None
    reject_spam: Annotated[SpamRule | None, BeforeValidator(_spam_rule)] = None


class SmtpEdgeConfig(_Model):
    """An SMTP edge (``SmtpEdge``): every limit under its own name, with SmtpEdge's default."""

    type: Literal["smtp"]
    queue: str
    listener: Annotated[list[Listener], BeforeValidator(_listeners)] = [Listener()]
    hostname: str | None = None
    max_size: int = Field(10 * 1024 * 1024, ge=0)
    tls: ServerTls | None = None
    tls_immediately: bool = False
    proxyprotocol: Annotated[bool | Literal["v1", "v2", "any"], _one_of(
        True, False, "v1", "v2", "any",
        message="expected false, true, 'v1', 'v2' or 'any'")] = False
    trusted_proxies: list[str] = ["127.0.0.0/8", "::1"]
    proxy_timeout: float = Field(5.0, gt=0)
    auth: Annotated[bool | list[str] | None, _one_of(
        True, False, None, lists=True,
        message="expected true, false or a list of mechanisms")] = None
    auth_require_tls: bool = True
    command_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(600.0, gt=0)
    max_recipients: int | None = Field(1000, ge=1)
    max_bad_commands: int | None = Field(20, ge=1)
    max_auth_failures: int | None = Field(3, ge=1)
    max_connections: int | None = Field(1000, ge=1)
    max_connections_per_ip: int | None = Field(50, ge=1)
    shutdown_timeout: float = Field(30.0, ge=0)
    backlog: int = Field(1024, ge=1)
    rules: Annotated[EdgeRules, BeforeValidator(_empty(dict))] = EdgeRules()

    @model_validator(mode="after")
    def _combinations(self) -> SmtpEdgeConfig:
        if self.tls_immediately and self.tls is None:
            raise ConfigValueError("tls_immediately needs tls {certfile, keyfile}",
                                   "tls_immediately")
        if self.tls_immediately and self.proxyprotocol:
            raise ConfigValueError("cannot be combined with tls_immediately", "proxyprotocol")
        return self


def _regex(value: Any) -> Any:
    if value is not None:
        if not isinstance(value, str):
            raise ConfigValueError("expected a regular expression")
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigValueError(f"invalid regular expression: {exc}") from None
    return value


class HttpUser(_Model):
    """One basic-auth user of an HTTP edge: ``{password}`` (``{SCHEME}`` hashes allowed)."""

    password: str


class HttpEdgeAuth(_Model):
    """Who may post to an HTTP edge: give one of ``token`` (a bearer token), ``users``
    (basic auth: ``{name: {password: ...}}``) or ``lookup_credentials`` (basic auth
    against a lookup's records, looked up by ``{username}``, with a ``password`` field)."""

    token: str | None = None
    users: dict[str, HttpUser] | None = None
    lookup_credentials: LookupRef | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HttpEdgeAuth:
        given = [k for k in ("token", "users", "lookup_credentials")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigValueError("give exactly one of token, users and lookup_credentials")
        return self


class HttpEdgeConfig(_Model):
    """An HTTP edge (``HttpEdge``): messages POSTed as in the original's ``type: http``.

    ``uri`` is a regular expression matched at the start of the request path.
    """

    type: Literal["http"]
    queue: str
    listener: Annotated[list[Listener], BeforeValidator(_listeners)] = [
        Listener(interface="127.0.0.1", port=8025)]
    hostname: str | None = None
    uri: Annotated[str | None, BeforeValidator(_regex)] = None
    tls: ServerTls | None = None
    max_size: int = Field(10 * 1024 * 1024, ge=0)
    max_recipients: int | None = Field(1000, ge=1)
    data_timeout: float = Field(600.0, gt=0)
    shutdown_timeout: float = Field(30.0, ge=0)
    backlog: int = Field(1024, ge=1)
    auth: HttpEdgeAuth | None = None


class CustomEdgeConfig(_Model):
    """``factory`` (``module:callable``) is called with ``options`` and the queue."""

    type: Literal["custom"]
    queue: str
    factory: Factory
    options: dict[str, Any] = {}


EdgeConfig = Annotated[
    Annotated[SmtpEdgeConfig, Tag("smtp")]
    | Annotated[HttpEdgeConfig, Tag("http")]
    | Annotated[CustomEdgeConfig, Tag("custom")],
    Discriminator(_type_of()),
]


# --- queues -------------------------------------------------------------------

class RetryConfig(_Model):
    """When to try again.

    ``maximum``: give up after this many attempts. ``delay``: seconds before
    the next attempt as an expression of ``x``, the attempts so far
    (``30*x``, ``300*2**(x-1)``). Or, instead of ``delay``, an exponential
    backoff: ``initial`` seconds, doubling up to ``max``, with ``jitter``;
    ``lifetime`` seconds after which a message is given up in either form.
    Without a ``retry`` section a queue retries Postfix-like: 5 minutes,
    doubling up to an hour, for 5 days.
    """

    maximum: int | None = Field(None, ge=0)
    delay: RetryDelay | None = None
    initial: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)
    lifetime: float | None = Field(None, gt=0)
    jitter: float | None = Field(None, ge=0, lt=1)

    @model_validator(mode="after")
    def _one_form(self) -> RetryConfig:
        if self.delay is not None:
            for other in ("initial", "max", "jitter"):
                if getattr(self, other) is not None:
                    raise ConfigValueError("give either delay or initial/max/jitter, not both",
                                           other)
        if self.initial is not None and self.max is not None and self.max < self.initial:
            raise ConfigValueError("must not be less than initial", "max")
        return self


class _QueueBase(_Model):
    relay: str | None = None
    bounce_queue: str | None = None
    retry: RetryConfig | None = None
    policies: Policies = []
    relay_pool: int = Field(10, ge=1)


class MemoryQueueConfig(_QueueBase):
    """In memory (``DictStorage``): nothing survives the process."""

    type: Literal["memory"]


class SqliteQueueConfig(_QueueBase):
    """Durable in one SQLite file (the default type). ``path`` None: ``<data dir>/<name>.db``."""

    type: Literal["sqlite"] = "sqlite"
    path: str | None = None
    synchronous: Literal["FULL", "NORMAL"] = "FULL"


class ProxyQueueConfig(_Model):
    """No storage: each message is relayed while the client waits."""

    type: Literal["proxy"]
    relay: str
    policies: Policies = []


class CustomQueueConfig(_QueueBase):
    """``factory`` (``module:callable``) is called with ``options`` and the relay."""

    type: Literal["custom"]
    factory: Factory
    options: dict[str, Any] = {}


class _SharedQueueBase(_QueueBase):
    lease: float = Field(300.0, gt=0)
    owner: str | None = None


class PostgresQueueConfig(_SharedQueueBase):
    """Shared by every host and worker on one PostgreSQL database (``PostgresStorage``)."""

    type: Literal["postgres"]
    dsn: str = "postgresql://127.0.0.1:5432/slimta"
    schema_: str = Field("slimta", alias="schema", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    pool_size: int = Field(10, ge=1)


class RedisQueueConfig(_SharedQueueBase):
    """Shared by every host and worker on one Redis server (``RedisStorage``).

    ``url`` or the original app's keys ``host``, ``port``, ``db``, ``password``.
    """

    type: Literal["redis"]
    url: str | None = None
    host: str = "localhost"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    password: str | None = None
    prefix: str = "slimta:"
    socket_timeout: float | None = Field(None, gt=0)


QueueConfig = Annotated[
    Annotated[SqliteQueueConfig, Tag("sqlite")]
    | Annotated[MemoryQueueConfig, Tag("memory")]
    | Annotated[ProxyQueueConfig, Tag("proxy")]
    | Annotated[CustomQueueConfig, Tag("custom")]
    | Annotated[RedisQueueConfig, Tag("redis")]
    | Annotated[PostgresQueueConfig, Tag("postgres")],
    Discriminator(_type_of("sqlite")),
]


# --- relays -------------------------------------------------------------------

class _SmtpRelayBase(_Model):
    pool_size: int | None = Field(None, ge=1, validation_alias=AliasChoices(
        "pool_size", "concurrent_connections"))
    tls: ClientTls | None = None
    tls_required: bool = False
    credentials: Credentials | None = None
    ehlo_as: str | None = None
    source_address: str | None = None
    connect_timeout: float = Field(30.0, gt=0)
    command_timeout: float = Field(300.0, gt=0)
    data_timeout: float = Field(600.0, gt=0)
    idle_timeout: float = Field(10.0, ge=0)
    policies: Policies = []


class MxRelayConfig(_SmtpRelayBase):
    """Delivery to each recipient domain's MX hosts."""

    type: Literal["mx"]
    port: int = Field(25, ge=1, le=65535)
    nameservers: list[str] | None = None
    force_mx: dict[str, str] = {}
    override_mx: dict[str, str] = {}


class StaticRelayConfig(_SmtpRelayBase):
    """Everything to one SMTP server (a smarthost)."""

    type: Literal["static"]
    host: str
    port: int = Field(25, ge=1, le=65535)
    tls_immediately: bool = False
    starttls: bool = True


class LmtpRelayConfig(_SmtpRelayBase):
    """LMTP to a mail store: ``host`` and ``port``, or a Unix socket path as ``host``."""

    type: Literal["lmtp"]
    host: str = "localhost"
    port: int = Field(24, ge=1, le=65535)


class PipeRelayConfig(_Model):
    """Runs a program (no shell) with the message on stdin; ``{sender}``… macros in ``args``."""

    type: Literal["pipe"]
    args: Annotated[list[str], Field(min_length=1)]
    timeout: float | None = Field(None, gt=0)
    per_recipient: bool = False
    env: dict[str, str] | None = None
    return_path: bool = False
    delivered_to: bool = False
    unix_newlines: bool = False
    tempfail_codes: list[int] = [75]
    max_output: int = Field(4096, ge=0)
    policies: Policies = []


class MaildropRelayConfig(_Model):
    """``maildrop -f {sender}``."""

    type: Literal["maildrop"]
    path: str = "maildrop"
    timeout: float | None = Field(None, gt=0)
    extra_args: list[str] | None = None
    user: str | None = None
    policies: Policies = []


class DovecotRelayConfig(_Model):
    """``dovecot-lda`` per recipient."""

    type: Literal["dovecot"]
    path: str = "/usr/lib/dovecot/dovecot-lda"
    timeout: float | None = Field(None, gt=0)
    extra_args: list[str] | None = None
    user: str | None = "{recipient}"
    policies: Policies = []


class MaildirRelayConfig(_Model):
    """Into a Maildir; ``{recipient}``, ``{localpart}``, ``{domain}`` in ``path``: per recipient."""

    type: Literal["maildir"]
    path: str
    fsync: bool = True
    policies: Policies = []


class BlackholeRelayConfig(_Model):
    """Accepts and discards."""

    type: Literal["blackhole"]
    policies: Policies = []


def _http_url(value: Any) -> Any:
    if not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value, re.I):
        raise ConfigValueError("expected an http:// or https:// URL")
    return value


class HttpRelayConfig(_Model):
    """Delivery by HTTP POST to another slimta's HTTP edge (``HttpRelay``).

    ``token`` sends ``Authorization: Bearer``, ``credentials`` basic auth;
    ``headers`` are added to every request.
    """

    type: Literal["http"]
    url: Annotated[str, BeforeValidator(_http_url)]
    pool_size: int | None = Field(None, ge=1, validation_alias=AliasChoices(
        "pool_size", "concurrent_connections"))
    tls: ClientTls | None = None
    ehlo_as: str | None = None
    timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(10.0, ge=0)
    headers: dict[str, str] = {}
    token: str | None = None
    credentials: Credentials | None = None
    policies: Policies = []

    @model_validator(mode="after")
    def _one_auth(self) -> HttpRelayConfig:
        if self.token is not None and self.credentials is not None:
            raise ConfigValueError("give token or credentials, not both", "credentials")
        return self


class CustomRelayConfig(_Model):
    """``factory`` (``module:callable``) is called with ``options`` and returns the relay."""

    type: Literal["custom"]
    factory: Factory
    options: dict[str, Any] = {}
    policies: Policies = []


RelayConfig = Annotated[
    Annotated[MxRelayConfig, Tag("mx")]
    | Annotated[StaticRelayConfig, Tag("static")]
    | Annotated[LmtpRelayConfig, Tag("lmtp")]
    | Annotated[PipeRelayConfig, Tag("pipe")]
    | Annotated[MaildropRelayConfig, Tag("maildrop")]
    | Annotated[DovecotRelayConfig, Tag("dovecot")]
    | Annotated[MaildirRelayConfig, Tag("maildir")]
    | Annotated[BlackholeRelayConfig, Tag("blackhole")]
    | Annotated[HttpRelayConfig, Tag("http")]
    | Annotated[CustomRelayConfig, Tag("custom")],
    Discriminator(_type_of()),
]


# --- process ------------------------------------------------------------------

class AdminConfig(_Model):
    """The admin/metrics HTTP endpoint; ``token`` (if set) is required as a bearer token."""

    listener: Listener = Listener(interface="127.0.0.1", port=8025)
    token: str | None = None
    allowed_hosts: list[str] | None = None


class ProcessConfig(_Model):
    """Settings of one process (the ``slimta`` entry is the daemon's).

    ``daemon``, ``stdout`` and ``stderr`` are accepted for the original's
    configs; slimta runs in the foreground (use systemd).
    """

    daemon: bool = False
    stdout: str | None = None
    stderr: str | None = None
    user: str | None = None
    group: str | None = None
    pid_file: str | None = None
    hostname: str | None = None
    fqdn: str | None = None
    data_dir: str | None = None
    logging: dict[str, Any] | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    shutdown_timeout: float = Field(30.0, ge=0)
    admin: AdminConfig | None = None
    #: worker processes of ``slimta serve`` (1: one process, no supervisor; see slimta.app.workers)
    workers: int = Field(1, ge=1, le=256)

    @field_validator("logging")
    @classmethod
    def _dict_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("version") != 1:
            raise ConfigValueError("a logging.config.dictConfig mapping needs 'version: 1'")
        return value


_T = TypeVar("_T")
#: a section: named entries; written empty (``lookup:``) it has none
Section = Annotated[dict[str, _T], BeforeValidator(_empty(dict))]


# --- the whole config ---------------------------------------------------------

class Config(_Model):
    """A whole slimta config: named processes, edges, queues, relays and lookups."""

    process: Section[Annotated[ProcessConfig, BeforeValidator(_empty(dict))]] = {}
    edge: Section[EdgeConfig] = {}
    queue: Section[QueueConfig] = {}
    relay: Section[RelayConfig] = {}
    lookup: Section[LookupConfig] = {}

    _path: str | None = PrivateAttr(None)

    @property
    def path(self) -> str | None:
        """The file this config was loaded from (relative paths in it are relative to its
        directory), or None."""
        return self._path

    def process_settings(self, name: str = "slimta") -> ProcessConfig:
        """The ``process`` entry called ``name``, or the defaults when there is none."""
        return self.process.get(name) or ProcessConfig()

    @model_validator(mode="after")
    def _references(self) -> Config:
        def check(target: str | None, section: str, *loc: str | int) -> None:
            names = getattr(self, section)
            if target is not None and target not in names:
                known = ", ".join(names) or "none defined"
                raise ConfigValueError(f"no {section} named {target!r} ({known})", *loc)

        for name, edge in self.edge.items():
            check(edge.queue, "queue", "edge", name, "queue")
            if isinstance(edge, SmtpEdgeConfig):
                for field in ("lookup_senders", "lookup_recipients", "lookup_credentials"):
                    ref = getattr(edge.rules, field)
                    if isinstance(ref, str):
                        check(ref, "lookup", "edge", name, "rules", field)
            elif isinstance(edge, HttpEdgeConfig) and edge.auth is not None \
                    and isinstance(edge.auth.lookup_credentials, str):
                check(edge.auth.lookup_credentials, "lookup", "edge", name, "auth",
                      "lookup_credentials")
        for name, queue in self.queue.items():
            check(queue.relay, "relay", "queue", name, "relay")
            check(getattr(queue, "bounce_queue", None), "queue", "queue", name, "bounce_queue")
            self._policy_refs(check, queue.policies, "queue", name)
        for name, relay in self.relay.items():
            self._policy_refs(check, relay.policies, "relay", name)
        return self

    @staticmethod
    def _policy_refs(check: Callable[..., None], policies: list, *loc: str) -> None:
        for i, policy in enumerate(policies):
            if isinstance(policy, LookupPolicyConfig) and isinstance(policy.lookup, str):
                # the policy's tag, then its key, as pydantic's own locs have them
                check(policy.lookup, "lookup", *loc, "policies", i, "lookup", "lookup")

    def masked(self) -> dict[str, Any]:
        """The resolved config as plain data, with passwords, keys and tokens masked."""
        return _mask(self.model_dump(mode="json"))

    def dump_masked(self) -> str:
        """:meth:`masked` as YAML."""
        return yaml.safe_dump(self.masked(), sort_keys=False, default_flow_style=False)


_SECRET_KEYS = {"password", "passwd", "secret", "token", "key", "private_key", "api_key"}
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/@:\s]*:)[^/@\s]+(?=@)", re.I)


def _is_secret(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    key = key.lower()
    return key in _SECRET_KEYS or key.endswith(("_password", "_secret", "_token"))


def _mask(value: Any, key: Any = None) -> Any:
    if _is_secret(key) and value is not None and not isinstance(value, dict | list):
        return MASK
    if key == "credentials" and isinstance(value, list):  # logging's SMTPHandler
        return [MASK for _ in value]
    if isinstance(value, dict):
        first = {"type": value["type"]} if "type" in value else {}
        return first | {k: _mask(v, k) for k, v in value.items() if k != "type"}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, value)
    return value


# --- loading and error messages -----------------------------------------------

_SECTIONS = {"edge": "edge", "queue": "queue", "relay": "relay", "lookup": "lookup"}
_LOOKUP_REFS = ("lookup", "lookup_senders", "lookup_recipients", "lookup_credentials")
_KIND_FIELDS = {"policies": "policy", "lookup": "lookup", "lookup_senders": "lookup",
                "lookup_recipients": "lookup", "lookup_credentials": "lookup"}


def _locate(data: Any, loc: tuple) -> tuple[list[str | int], Mark | None, bool]:
    """Follow a pydantic ``loc`` through the loaded data: the key path, its mark, and
    whether the whole path was found (False: the last key is missing)."""
    node, mark, parts, found = data, getattr(data, "mark", None), [], True
    tagged = None
    for i, elem in enumerate(loc):
        # a discriminated union's tag (the entry's type) comes first, once per entry
        if isinstance(node, dict) and node.get("type") == elem and tagged is not node:
            tagged = node
            continue
        if isinstance(node, dict) and elem in node:
            if isinstance(node, LineDict):
                mark = node.key_marks.get(elem, mark)
            node = node[elem]
            parts.append(elem)
        elif isinstance(node, list) and isinstance(elem, int) and 0 <= elem < len(node):
            if isinstance(node, LineList) and elem < len(node.item_marks):
                mark = node.item_marks[elem]
            node = node[elem]
            parts.append(elem)
        elif isinstance(node, dict) and i == len(loc) - 1 and isinstance(elem, str):
            parts.append(elem)
            found = False
    return parts, mark, found


def _path(parts: list[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _kind(parts: list[str | int]) -> str:
    for part in reversed(parts[2:]):
        if isinstance(part, str) and part in _KIND_FIELDS:
            return _KIND_FIELDS[part]
    return _SECTIONS.get(str(parts[0]), "entry") if parts else "entry"


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
           "less_than_equal": "<="}
_TYPE_WORDS = {
    "string_type": "expected a string", "int_type": "expected an integer",
    "int_parsing": "expected an integer", "int_from_float": "expected an integer",
    "float_type": "expected a number", "float_parsing": "expected a number",
    "bool_type": "expected true or false", "bool_parsing": "expected true or false",
    "dict_type": "expected a mapping", "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping", "list_type": "expected a list",
}


def _problem(data: Any, err: dict[str, Any]) -> Problem:
    kind, loc, ctx = err["type"], tuple(err["loc"]), err.get("ctx") or {}
    error = ctx.get("error")
    if isinstance(error, ConfigValueError):
        loc = loc + error.loc
    parts, mark, found = _locate(data, loc)
    if isinstance(error, ValueError):
        message = str(error)
    elif kind == "extra_forbidden":
        message = "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc[:-1]), n=1,
                                        cutoff=0.75)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    elif kind == "missing" or not found:
        message = "required key missing"
    elif kind == "union_tag_invalid":
        tags = [t.strip("'") for t in str(ctx.get("expected_tags", "")).split(", ")]
        expected = ", ".join(t for t in tags if t != "ref")
        message = f"unknown {_kind(parts)} type {ctx.get('tag')!r} (expected one of: {expected})"
        node = _follow(data, parts)
        if isinstance(node, LineDict) and "type" in node:
            parts, mark = [*parts, "type"], node.key_marks.get("type", mark)
    elif kind == "union_tag_not_found":
        node = _follow(data, parts)
        if isinstance(node, dict) and not isinstance(node.get("type"), str | None):
            message, parts = "expected a string", [*parts, "type"]
        elif isinstance(node, dict):
            message, parts = "required key missing", [*parts, "type"]
        elif parts and parts[-1] in _LOOKUP_REFS and len(parts) > 2:
            message = "expected a lookup name or a mapping with a type"
        else:
            message = "expected a mapping"
    elif kind == "literal_error":
        message = f"expected {ctx.get('expected', 'one of the allowed values')}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()), "")
        message = f"expected a value {_BOUNDS[kind]} {bound}"
    elif kind in _TYPE_WORDS:
        message = _TYPE_WORDS[kind]
    else:
        message = err["msg"][0].lower() + err["msg"][1:]
    return Problem(mark, _path(parts), message)


def _known_keys(loc: tuple) -> list[str]:
    """The keys the model at ``loc`` (a pydantic loc, tags included) accepts."""
    tp: Any = Config
    for elem in loc:
        tp = _step(_unwrap(tp), elem)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    keys = []
    for name, field in tp.model_fields.items():
        keys.append(name)
        if isinstance(field.validation_alias, AliasChoices):
            keys.extend(str(a) for a in field.validation_alias.choices)
    return keys


def _unwrap(tp: Any) -> Any:
    """``tp`` without Annotated metadata or ``| None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _step(tp: Any, elem: str | int) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(elem))
        return field.annotation if field else None
    origin = get_origin(tp)
    if origin is dict:
        return get_args(tp)[1]
    if origin is list:
        return get_args(tp)[0]
    if origin in (Union, UnionType):
        for member in get_args(tp):
            if get_origin(member) is Annotated and any(
                    isinstance(m, Tag) and m.tag == elem for m in get_args(member)[1:]):
                return get_args(member)[0]
    return None


def _follow(data: Any, parts: list[str | int]) -> Any:
    for part in parts:
        data = data[part]
    return data


def parse_config(data: Any) -> Config:
    """A :class:`Config` from loaded YAML data; :class:`ConfigError` names each problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(Problem(getattr(data, "mark", None), "",
                                  "expected a mapping of sections at the top level"))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [_problem(data, err) for err in exc.errors()]
        raise ConfigError(sorted(problems, key=_order)) from None


def _order(problem: Problem) -> tuple:
    mark = problem.mark
    return (mark is None, mark.file if mark else "", mark.line if mark else 0, problem.path)


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config in the YAML file at ``path``; :class:`ConfigError` names each problem's line."""
    config = parse_config(load_yaml(path))
    config._path = os.fspath(path)
    return config
