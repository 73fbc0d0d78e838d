"""From a :class:`~slimta.app.config.Config` to running objects: :func:`build` makes an App.

Lookups, relays, queues (with their policies, retry and bounce queue) and
edges are made from the config's sections; the edges of type ``smtp`` get a
validator class made from their ``rules`` (:func:`validator_class`). The admin
endpoint (``process.slimta.admin``) serves metrics for every edge, relay and
queue, and the JSON queue API.

Paths: the data directory is ``process.slimta.data_dir`` (relative to the
config file's directory), else ``$SLIMTA_DATA_DIR``, else ``./slimta-data``.
Relative data paths in the config (a sqlite queue's ``path``, a maildir
relay's ``path``, a SQLite lookup's ``database``) are relative to the data
directory; TLS files and ``!include`` are relative to the config file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slimta.app import config as C
from slimta.app.yamlload import ConfigError, Problem

__all__ = ["DEFAULT_DATA_DIR", "FIRST_USER_LOOKUP", "App", "build", "data_dir_of",
           "ensure_first_user", "load_factory", "validator_class"]

log = logging.getLogger(__name__)

#: The data directory when neither the config nor ``$SLIMTA_DATA_DIR`` names one.
DEFAULT_DATA_DIR = "slimta-data"


#: The lookup of the embedded default's submission users (see :func:`ensure_first_user`).
FIRST_USER_LOOKUP = "submission_users"

#: In a worker process of ``slimta serve --workers N``: its
#: :class:`~slimta.app.workers.WorkerContext` (the listening sockets inherited
#: from the supervisor, its SQLite queue files, its admin port); None otherwise.
#: Module-wide because a SIGHUP reload builds the next generation here too.
worker: Any = None


def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(Problem(None, path, message))


def load_factory(spec: str, path: str) -> Callable[..., Any]:
    """The callable ``module:callable`` names; :class:`ConfigError` (at ``path``) if none."""
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise _fail(path, f"cannot load factory {spec!r}: {exc}") from None
    if not callable(obj):
        raise _fail(path, f"factory {spec!r} is not callable")
    return obj


def data_dir_of(config: C.Config, process: str = "slimta") -> str:
    """The data directory of ``config`` (see the module documentation), absolute."""
    settings = config.process_settings(process)
    base = os.path.dirname(os.path.abspath(config.path)) if config.path else os.getcwd()
    if settings.data_dir:
        return os.path.abspath(os.path.join(base, os.path.expanduser(settings.data_dir)))
    env = os.environ.get("SLIMTA_DATA_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.abspath(DEFAULT_DATA_DIR)


@dataclass
class App:
    """The objects one config makes, and their lifecycle.

    :meth:`start` starts the relays and queues, then the edges and the admin
    endpoint; :meth:`stop` stops them in the reverse order (edges first, so
    no new mail arrives while the queues finish their deliveries).
    """

    config: C.Config = field(repr=False)
    data_dir: str
    hostname: str
    lookups: dict[str, Any] = field(default_factory=dict)
    relays: dict[str, Any] = field(default_factory=dict)
    queues: dict[str, Any] = field(default_factory=dict)
    edges: dict[str, list[Any]] = field(default_factory=dict)
    admin: Any = None
    metrics: Any = None

    def start(self) -> None:
        """Start everything: binds the listeners at once (``OSError`` if one is taken)."""
        for relay in self.relays.values():
            if hasattr(relay, "start"):
                relay.start()
        for queue in self.queues.values():
            if hasattr(queue, "start"):
                queue.start()
        for edges in self.edges.values():
            for edge in edges:
                edge.start()
        if self.admin is not None:
            self.admin.start()

    async def started(self) -> None:
        """Wait until every part has begun."""
        for obj in self._all():
            if hasattr(obj, "started"):
                await obj.started()

    def _all(self) -> list[Any]:
        return [*self.relays.values(), *self.queues.values(),
                *(e for edges in self.edges.values() for e in edges),
                *([self.admin] if self.admin is not None else [])]

    async def stop(self) -> None:
        """Stop gracefully: the edges and admin endpoint, then the queues, then the relays."""
        edges = [e for group in self.edges.values() for e in group]
        if self.admin is not None:
            edges.append(self.admin)
        await asyncio.gather(*(e.stop() for e in edges), return_exceptions=True)
        await asyncio.gather(*(q.stop() for q in self.queues.values() if hasattr(q, "stop")),
                             return_exceptions=True)
        await asyncio.gather(*(r.stop() for r in self.relays.values() if hasattr(r, "stop")),
                             return_exceptions=True)
        for lookup in self.lookups.values():
            close = getattr(lookup, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


def shared_storage(spec: C.PostgresQueueConfig | C.RedisQueueConfig) -> Any:
    """The storage of a ``postgres`` or ``redis`` queue section (also for ``slimta queue``)."""
    if isinstance(spec, C.PostgresQueueConfig):
        from slimta.queue.postgres import PostgresStorage
        return PostgresStorage(spec.dsn, schema=spec.schema_, owner=spec.owner,
                               pool_size=spec.pool_size)
    from slimta.queue.redis import RedisStorage
    if spec.url is not None:
        return RedisStorage(spec.url, prefix=spec.prefix, owner=spec.owner,
                            socket_timeout=spec.socket_timeout)
    return RedisStorage(host=spec.host, port=spec.port, db=spec.db, password=spec.password,
                        prefix=spec.prefix, owner=spec.owner, socket_timeout=spec.socket_timeout)


class _Builder:
    def __init__(self, config: C.Config, no_edge: bool, no_relay: bool):
        self.config = config
        self.no_edge = no_edge
        self.no_relay = no_relay
        settings = config.process_settings()
        self.settings = settings
        self.data_dir = data_dir_of(config)
        self.config_dir = (os.path.dirname(os.path.abspath(config.path)) if config.path
                           else os.getcwd())
        self.hostname = settings.fqdn or settings.hostname or socket.getfqdn()
        self.app = App(config, self.data_dir, self.hostname)

    # --- paths -----------------------------------------------------------
    def data_path(self, path: str) -> str:
        return os.path.join(self.data_dir, os.path.expanduser(path))

    def config_path(self, path: str) -> str:
        return os.path.join(self.config_dir, os.path.expanduser(path))

    @staticmethod
    def listen_on(interface: str, port: int) -> Any:
        """An edge's listener: the address, or in a worker the supervisor's socket for it."""
        if worker is not None:  # bound once for every worker
            return worker.listener(interface, port)
        return (interface, port)

    # --- lookups ---------------------------------------------------------
    def lookup(self, spec: Any, path: str) -> Any:
        if isinstance(spec, str):
            return self.app.lookups[spec]
        if isinstance(spec, C.ConfigLookup):
            from slimta.lookup.dict import DictLookup
            return DictLookup(spec.map, spec.key_template)
        if isinstance(spec, C.RegexLookupConfig):
            from slimta.lookup.regex import RegexLookup
            return RegexLookup(list(spec.rules.items()), spec.key_template, groups=spec.groups)
        if isinstance(spec, C.SqlLookupConfig):
            from slimta.lookup.sql import SqlLookup
            database = spec.database
            is_url = "://" in database or "=" in database or spec.postgres
            if not is_url and database != ":memory:":
                database = self.data_path(database)
            return SqlLookup(database, spec.query, spec.key_template, postgres=spec.postgres,
                             min_size=spec.min_size, max_size=spec.max_size,
                             timeout=spec.timeout)
        if isinstance(spec, C.RedisLookupConfig):
            from slimta.lookup.redis import RedisLookup
            return RedisLookup(spec.url, spec.key_template, spec.kind, timeout=spec.timeout)
        if isinstance(spec, C.CustomLookupConfig):
            return load_factory(spec.factory, f"{path}.factory")(**spec.options)
        raise _fail(path, f"lookup {type(spec).__name__} is not supported")

    # --- policies --------------------------------------------------------
    def policy(self, spec: Any, path: str) -> Any:
        from slimta.policy import headers, split
        if isinstance(spec, C.AddDateHeaderPolicy):
            return headers.AddDateHeader(spec.localtime)
        if isinstance(spec, C.AddMessageIdHeaderPolicy):
            return headers.AddMessageIdHeader(spec.hostname or self.hostname)
        if isinstance(spec, C.AddReceivedHeaderPolicy):
            return headers.AddReceivedHeader(spec.date_format, spec.hostname or self.hostname,
                                             spec.localtime)
        if isinstance(spec, C.RecipientSplitPolicy):
            return split.RecipientSplit()
        if isinstance(spec, C.RecipientDomainSplitPolicy):
            return split.RecipientDomainSplit()
        if isinstance(spec, C.ForwardPolicy):
            from slimta.policy.forward import Forward
            return Forward(spec.mapping)
        if isinstance(spec, C.SpamAssassinPolicy):
            return self.spamd(spec)
        if isinstance(spec, C.LookupPolicyConfig):
            from slimta.policy.lookup import LookupPolicy
            return LookupPolicy(self.lookup(spec.lookup, f"{path}.lookup"), spec.on_sender,
                                spec.on_recipients, verp=spec.verp,
                                alias_field=spec.alias_field, verp_field=spec.verp_field,
                                headers_field=spec.headers_field,
                                verp_separator=spec.verp_separator)
        if isinstance(spec, C.DkimSignPolicy):
            from slimta.policy.dkim import DkimSign
            keys = {domain: (key.selector, self.key_data(key.key, key.key_file))
                    for domain, key in spec.keys.items()}
            return DkimSign.for_domains(keys, spec.headers, by=spec.by,
                                        seven_bit=spec.seven_bit)
        if isinstance(spec, C.DkimVerifyPolicy):
            from slimta.policy.dkim import DkimVerify
            return DkimVerify(minkey=spec.minkey, max_signatures=spec.max_signatures,
                              allow_sha1=spec.allow_sha1, arc=spec.arc)
        if isinstance(spec, C.AuthResultsPolicy):
            from slimta.policy.authresults import AddAuthenticationResults
            return AddAuthenticationResults(spec.authserv_id or self.hostname, dmarc=spec.dmarc,
                                            forged=spec.forged)
        if isinstance(spec, C.ArcSealPolicy):
            from slimta.policy.dkim import ArcSeal
            return ArcSeal(spec.selector, spec.domain,
                           self.key_data(spec.key, spec.key_file),
                           spec.authserv_id or self.hostname, spec.headers)
        if isinstance(spec, C.CustomPolicy):
            return load_factory(spec.factory, f"{path}.factory")(**spec.options)
        raise _fail(path, f"policy type {spec.type!r} is not wired into the daemon yet")

    def key_data(self, key: str | None, key_file: str | None) -> bytes:
        """A private key given in place (PEM text) or in a file (relative to the config)."""
        if key is not None:
            return key.encode()
        with open(self.config_path(str(key_file)), "rb") as f:
            return f.read()

    def spamd(self, spec: C.SpamAssassinConfig) -> Any:
        """A SpamAssassin client from ``spec``."""
        from slimta.policy.spamassassin import SpamAssassin
        address: Any = spec.socket or (spec.host, spec.port)
        return SpamAssassin(address, spec.timeout, spec.max_size, user=spec.user,
                            fail_open=spec.fail_open)

    def add_policies(self, target: Any, policies: list, path: str) -> None:
        for i, spec in enumerate(policies):
            target.add_policy(self.policy(spec, f"{path}.policies[{i}]"))

    # --- relays ----------------------------------------------------------
    def client_tls(self, tls: C.ClientTls | None) -> ssl.SSLContext | None:
        if tls is None:
            return None
        if tls.verify:
            context = ssl.create_default_context(
                cafile=self.config_path(tls.cafile) if tls.cafile else None)
        else:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if tls.certfile:
            context.load_cert_chain(self.config_path(tls.certfile),
                                    self.config_path(tls.keyfile) if tls.keyfile else None)
        return context

    def relay(self, spec: Any, path: str) -> Any:
        if isinstance(spec, C._SmtpRelayBase):
            common = dict(
                pool_size=spec.pool_size, context=self.client_tls(spec.tls),
                tls_required=spec.tls_required,
                credentials=((spec.credentials.username, spec.credentials.password)
                             if spec.credentials else None),
                ehlo_as=spec.ehlo_as or self.hostname, source_address=spec.source_address,
                connect_timeout=spec.connect_timeout, command_timeout=spec.command_timeout,
                data_timeout=spec.data_timeout, idle_timeout=spec.idle_timeout)
            if isinstance(spec, C.MxRelayConfig):
                from slimta.relay.smtp.mx import MxSmtpRelay
                resolver = None
                if spec.nameservers:
                    from slimta.util.dns import Resolver
                    resolver = Resolver(nameservers=spec.nameservers)
                return MxSmtpRelay(resolver=resolver, port=spec.port, force_mx=spec.force_mx,
                                   override_mx=spec.override_mx, **common)
            from slimta.relay.smtp.static import StaticLmtpRelay, StaticSmtpRelay
            if isinstance(spec, C.LmtpRelayConfig):
                return StaticLmtpRelay(spec.host, spec.port, **common)
            return StaticSmtpRelay(spec.host, spec.port, tls_immediately=spec.tls_immediately,
                                   starttls=spec.starttls, **common)
        from slimta.relay import pipe
        if isinstance(spec, C.PipeRelayConfig):
            return pipe.PipeRelay(spec.args, spec.timeout, spec.per_recipient, spec.env,
                                  return_path=spec.return_path,
                                  delivered_to=spec.delivered_to,
                                  unix_newlines=spec.unix_newlines,
                                  tempfail_codes=spec.tempfail_codes,
                                  max_output=spec.max_output)
        if isinstance(spec, C.MaildropRelayConfig):
            return pipe.MaildropRelay(spec.path, spec.timeout, spec.extra_args, spec.user)
        if isinstance(spec, C.DovecotRelayConfig):
            return pipe.DovecotLdaRelay(spec.path, spec.timeout, spec.extra_args, spec.user)
        if isinstance(spec, C.MaildirRelayConfig):
            from slimta.relay.maildir import MaildirRelay
            template = spec.path
            if not os.path.isabs(os.path.expanduser(template)):
                template = os.path.join(self.data_dir.replace("{", "{{").replace("}", "}}"),
                                        template)
            return MaildirRelay(os.path.expanduser(template), fsync=spec.fsync)
        if isinstance(spec, C.BlackholeRelayConfig):
            from slimta.relay.blackhole import BlackholeRelay
            return BlackholeRelay()
        if isinstance(spec, C.HttpRelayConfig):
            from slimta.relay.http import HttpRelay
            headers = dict(spec.headers)
            if spec.token is not None:
                headers["Authorization"] = f"Bearer {spec.token}"
            elif spec.credentials is not None:
                import base64
                pair = f"{spec.credentials.username}:{spec.credentials.password}"
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            return HttpRelay(spec.url, spec.pool_size, self.client_tls(spec.tls),
                             spec.ehlo_as or self.hostname, spec.timeout, spec.idle_timeout,
                             headers)
        if isinstance(spec, C.CustomRelayConfig):
            return load_factory(spec.factory, f"{path}.factory")(**spec.options)
        raise _fail(path, f"relay type {spec.type!r} is not wired into the daemon yet")

    # --- queues ----------------------------------------------------------
    def backoff(self, retry: C.RetryConfig | None) -> Callable | None:
        from slimta.queue import exponential_backoff
        if retry is None:
            return None
        if retry.delay is None:
            kwargs = {k: v for k, v in (("initial", retry.initial), ("maximum", retry.max),
                                        ("lifetime", retry.lifetime), ("jitter", retry.jitter))
                      if v is not None}
            inner = exponential_backoff(**kwargs)
        else:
            inner = _expression_backoff(retry.delay, retry.lifetime)
        if retry.maximum is None:
            return inner
        maximum = retry.maximum

        def backoff(envelope: Any, attempts: int) -> float | None:
            if attempts >= maximum:
                return None
            return inner(envelope, attempts)

        return backoff

    def queue(self, name: str, spec: Any, path: str) -> Any:
        relay = None
        if getattr(spec, "relay", None) and not self.no_relay:
            relay = self.app.relays[spec.relay]
        if isinstance(spec, C.ProxyQueueConfig):
            from slimta.queue.proxy import ProxyQueue
            if relay is None:
                raise _fail(path, "a proxy queue cannot run without its relay (--no-relay)")
            return ProxyQueue(relay)
        if isinstance(spec, C.CustomQueueConfig):
            return load_factory(spec.factory, f"{path}.factory")(relay=relay, **spec.options)
        from slimta.queue import Queue
        if isinstance(spec, C.SqliteQueueConfig):
            from slimta.queue.sqlite import SqliteStorage
            file = self.data_path(spec.path or f"{name}.db")
            if worker is not None:  # each worker owns a file; shared storages stay as they are
                file = worker.queue_path(file)
            store: Any = SqliteStorage(file, synchronous=spec.synchronous)
        elif isinstance(spec, C.MemoryQueueConfig):
            from slimta.queue.dict import DictStorage
            store = DictStorage()
        elif isinstance(spec, C.PostgresQueueConfig | C.RedisQueueConfig):
            if worker is not None and spec.owner:  # each worker holds its own leases
                spec = spec.model_copy(update={"owner": f"{spec.owner}:{worker.number}"})
            store = shared_storage(spec)
            return Queue(store, relay, backoff=self.backoff(spec.retry),
                         relay_pool=spec.relay_pool, hostname=self.hostname, lease=spec.lease)
        else:
            raise _fail(path, f"queue type {spec.type!r} is not wired into the daemon yet")
        # a delivery-only process (--no-edge) shares the storage with an edge-only
        # one: it must look for what the other stores
        return Queue(store, relay, backoff=self.backoff(spec.retry), relay_pool=spec.relay_pool,
                     hostname=self.hostname, poll_interval=1.0 if self.no_edge else None)

    # --- edges -----------------------------------------------------------
    def server_tls(self, tls: C.ServerTls | None) -> ssl.SSLContext | None:
        if tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config_path(tls.certfile),
                                self.config_path(tls.keyfile) if tls.keyfile else None)
        return context

    def edge(self, name: str, spec: Any, path: str) -> list[Any]:
        queue = self.app.queues[spec.queue]
        if isinstance(spec, C.CustomEdgeConfig):
            made = load_factory(spec.factory, f"{path}.factory")(queue=queue, **spec.options)
            return list(made) if isinstance(made, list | tuple) else [made]
        if isinstance(spec, C.HttpEdgeConfig):
            from slimta.edge.http import HttpEdge
            auth: Any = None
            if spec.auth is not None and spec.auth.token is not None:
                auth = spec.auth.token
            elif spec.auth is not None and spec.auth.users is not None:
                auth = {user: record.password for user, record in spec.auth.users.items()}
            elif spec.auth is not None:
                ref, where = spec.auth.lookup_credentials, f"{path}.auth.lookup_credentials"
                if isinstance(ref, str) and ref not in self.app.lookups:
                    raise _fail(where, f"no lookup named {ref!r}")
                auth = self.lookup(ref, where)
            context = self.server_tls(spec.tls)
            return [HttpEdge(self.listen_on(listener.interface, listener.port), queue,
                             uri_pattern=spec.uri,
                             context=context, hostname=spec.hostname or self.hostname,
                             max_size=spec.max_size, auth=auth,
                             max_recipients=spec.max_recipients, data_timeout=spec.data_timeout,
                             shutdown_timeout=spec.shutdown_timeout, backlog=spec.backlog)
                    for listener in spec.listener]
        from slimta.edge.smtp import SmtpEdge
        hostname = spec.hostname or self.hostname
        lookup = {field: self.lookup(getattr(spec.rules, field), f"{path}.rules.{field}")
                  for field in ("lookup_senders", "lookup_recipients", "lookup_credentials")
                  if getattr(spec.rules, field) is not None}
        validators = validator_class(spec.rules, hostname, lookup,
                                     self.spamd if spec.rules.reject_spam else None,
                                     f"{path}.rules")
        auth = spec.auth
        if auth is None:
            auth = "lookup_credentials" in lookup
        context = self.server_tls(spec.tls)
        edges = []
        for listener in spec.listener:
            edges.append(SmtpEdge(
                self.listen_on(listener.interface, listener.port), queue, spec.max_size, validators,
                auth=auth, context=context, tls_immediately=spec.tls_immediately,
                command_timeout=spec.command_timeout, data_timeout=spec.data_timeout,
                hostname=hostname, auth_require_tls=spec.auth_require_tls,
                max_recipients=spec.max_recipients, max_bad_commands=spec.max_bad_commands,
                max_auth_failures=spec.max_auth_failures,
                max_connections=spec.max_connections,
                max_connections_per_ip=spec.max_connections_per_ip,
                shutdown_timeout=spec.shutdown_timeout, backlog=spec.backlog,
                proxy_protocol=spec.proxyprotocol, trusted_proxies=spec.trusted_proxies,
                proxy_timeout=spec.proxy_timeout))
        return edges

    # --- all -------------------------------------------------------------
    def build(self) -> App:
        config, app = self.config, self.app
        for name, spec in config.lookup.items():
            app.lookups[name] = self.lookup(spec, f"lookup.{name}")
        if not self.no_relay:
            for name, spec in config.relay.items():
                relay = self.relay(spec, f"relay.{name}")
                self.add_policies(relay, spec.policies, f"relay.{name}")
                app.relays[name] = relay
        for name, spec in config.queue.items():
            queue = self.queue(name, spec, f"queue.{name}")
            if hasattr(queue, "add_policy"):
                self.add_policies(queue, spec.policies, f"queue.{name}")
            app.queues[name] = queue
        for name, spec in config.queue.items():
            bounce = getattr(spec, "bounce_queue", None)
            if bounce is not None and hasattr(app.queues[name], "bounce_queue"):
                app.queues[name].bounce_queue = app.queues[bounce]
        if not self.no_edge:
            for name, spec in config.edge.items():
                app.edges[name] = self.edge(name, spec, f"edge.{name}")
        self.admin()
        return app

    def admin(self) -> None:
        admin = self.settings.admin
        if admin is None:
            return
        from slimta.app.admin import AdminServer
        from slimta.app.metrics import Metrics
        metrics = Metrics()
        app = self.app
        for edges in app.edges.values():
            for edge in edges:
                metrics.instrument_edge(edge)
        for relay in app.relays.values():
            with contextlib.suppress(AttributeError, TypeError):
                metrics.instrument_relay(relay)
        for name, queue in app.queues.items():
            with contextlib.suppress(AttributeError, TypeError):
                metrics.instrument_queue(queue, name)
        queues = {n: q for n, q in app.queues.items() if hasattr(q, "stats")}
        app.metrics = metrics
        port = admin.listener.port if worker is None else worker.admin_port(admin.listener.port)
        app.admin = AdminServer(admin.listener.interface or "127.0.0.1", port,
                                admin.token, metrics, queues, allowed_hosts=admin.allowed_hosts)


def _expression_backoff(delay: C.RetryExpression, lifetime: float | None) -> Callable:
    import time

    def backoff(envelope: Any, attempts: int) -> float | None:
        arrival = getattr(envelope, "timestamp", None)
        if lifetime is not None and arrival is not None and time.time() - arrival >= lifetime:
            return None
        return delay(attempts)

    return backoff


def build(config: C.Config, *, no_edge: bool = False, no_relay: bool = False) -> App:
    """The :class:`App` ``config`` describes, not yet started.

    ``no_edge``: no edges (a delivery-only process over the same queue
    storage); ``no_relay``: no relays, so the queues only store (an
    edge-only process). Raises :class:`ConfigError` for what the schema could
    not check (a factory that does not load, a TLS file that cannot be read).
    """
    try:
        return _Builder(config, no_edge, no_relay).build()
    except OSError as exc:
        raise _fail("", f"{exc}") from None
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise _fail("", str(exc)) from None


# --- SMTP edge rules -------------------------------------------------------------

def _address_matcher(allowed: list[str]) -> Callable[[str], bool]:
    addresses = {a.lower() for a in allowed if not a.startswith("@")}
    domains = {a[1:].lower() for a in allowed if a.startswith("@")}

    def match(address: str) -> bool:
        address = address.lower()
        return address in addresses or address.rpartition("@")[2] in domains

    return match


def _regex_matcher(patterns: list[str]) -> Callable[[str], bool]:
    import re
    compiled = [re.compile(p) for p in patterns]
    return lambda address: any(p.search(address) for p in compiled)


def validator_class(rules: C.EdgeRules, hostname: str, lookups: dict[str, Any],
                    spamd: Callable[[Any], Any] | None = None,
                    path: str = "rules") -> type:
    """An :class:`~slimta.edge.smtp.SmtpValidators` subclass enforcing ``rules``.

    ``lookups`` holds the built lookups of ``lookup_senders``,
    ``lookup_recipients`` and ``lookup_credentials``; ``spamd`` makes the
    SpamAssassin client of ``reject_spam`` from its config.
    """
    from slimta.edge.smtp import SmtpValidators
    from slimta.lookup import LookupError as LookupFailed

    checks_mail: list[Callable[[str], bool]] = []
    checks_rcpt: list[Callable[[str], bool]] = []
    if rules.only_senders is not None:
        checks_mail.append(_address_matcher(rules.only_senders))
    if rules.regex_senders is not None:
        checks_mail.append(_regex_matcher(rules.regex_senders))
    if rules.only_recipients is not None:
        checks_rcpt.append(_address_matcher(rules.only_recipients))
    if rules.regex_recipients is not None:
        checks_rcpt.append(_regex_matcher(rules.regex_recipients))
    senders = lookups.get("lookup_senders")
    recipients = lookups.get("lookup_recipients")
    credentials = None
    if "lookup_credentials" in lookups:
        from slimta.lookup.credentials import LookupCredentials
        credentials = LookupCredentials(lookups["lookup_credentials"])
    banner = None
    if rules.banner is not None:
        try:
            banner = rules.banner.format(fqdn=hostname, hostname=hostname)
        except (KeyError, IndexError, ValueError) as exc:
            raise _fail(f"{path}.banner", f"bad template ({exc}): use {{fqdn}}") from None

    async def handle_banner(self: Any, reply: Any, address: tuple) -> None:
        if banner is not None:
            reply.message = banner

    async def handle_auth(self: Any, reply: Any, creds: Any) -> None:
        if credentials is None:
            reply.code, reply.message = "535", "5.7.8 Authentication credentials invalid"
            return
        await credentials.handle_auth(reply, creds)

    async def handle_mail(self: Any, reply: Any, sender: str, params: dict) -> None:
        if credentials is not None and self.session.auth is None:
            reply.code, reply.message = "530", "5.7.0 Authentication required"
            return
        if any(not check(sender) for check in checks_mail):
            reply.code, reply.message = "550", "5.7.1 Sender not allowed"
            return
        if (senders is not None and not await _found(senders, sender, reply)
                and reply.code.startswith("2")):
                reply.code, reply.message = "550", "5.7.1 Sender not allowed"

    async def handle_rcpt(self: Any, reply: Any, recipient: str, params: dict) -> None:
        if any(not check(recipient) for check in checks_rcpt):
            reply.code, reply.message = "550", "5.7.1 Recipient not allowed"
            return
        if (recipients is not None and not await _found(recipients, recipient, reply)
                and reply.code.startswith("2")):
                reply.code, reply.message = "550", "5.1.1 Recipient unknown"

    async def _found(lookup: Any, address: str, reply: Any) -> bool:
        try:
            return await lookup.lookup_address(address) is not None
        except LookupFailed as exc:
            log.warning("lookup of <%s> failed: %s", address, exc)
            reply.code, reply.message = "451", "4.3.0 Temporary lookup failure"
            return False

    hooks: dict[str, Any] = {"handle_banner": handle_banner, "handle_mail": handle_mail,
                             "handle_rcpt": handle_rcpt, "__doc__": "Rules from the config."}
    if credentials is not None:
        hooks["handle_auth"] = handle_auth
    if rules.dnsbl:
        from slimta.util.dnsbl import check_dnsbl
        for zone in reversed(rules.dnsbl):
            hooks["handle_banner"] = check_dnsbl(zone, match_code="554")(hooks["handle_banner"])
    if rules.reject_spf:
        from slimta.util.spf import EnforceSpf
        spf = EnforceSpf()
        for result in rules.reject_spf:
            spf.set_enforcement(result)
        hooks["handle_mail"] = spf.check(hooks["handle_mail"])
    if rules.reject_spam is not None and spamd is not None:
        from slimta.policy.spamassassin import check_spam

        async def handle_have_data(self: Any, reply: Any, data: bytes) -> None:
            pass

        hooks["handle_have_data"] = check_spam(spamd(rules.reject_spam),
                                               rules.reject_spam.reject_above)(handle_have_data)
    return type("ConfigValidators", (SmtpValidators,), hooks)


def ensure_first_user(config: C.Config, username: str = "user@localhost") -> tuple | None:
    """Create the submission users' database of the embedded default at the first start.

    When ``config`` has a SQLite lookup named :data:`FIRST_USER_LOOKUP` whose
    file does not exist yet, the file is made with a table ``users (username,
    password)`` holding ``username`` with a random password, stored as a
    SHA512-CRYPT hash. Returns ``(username, password, path)`` then (the only
    time the password is known), else None.
    """
    import secrets
    import sqlite3

    spec = config.lookup.get(FIRST_USER_LOOKUP)
    if not isinstance(spec, C.SqlLookupConfig) or "://" in spec.database or spec.postgres:
        return None
    path = os.path.join(data_dir_of(config), os.path.expanduser(spec.database))
    if os.path.exists(path):
        return None
    from passlib.hash import sha512_crypt

    password = secrets.token_urlsafe(12)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    conn = sqlite3.connect(tmp)
    try:
        with conn:
            conn.execute("CREATE TABLE users (username TEXT PRIMARY KEY, password TEXT NOT NULL)")
            conn.execute("INSERT INTO users VALUES (?, ?)",
                         (username, sha512_crypt.hash(password)))
    finally:
        conn.close()
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return username, password, path
