"""slimta.relay.smtp.mx_lookup against a real dnsmasq (and a scripted server for SERVFAIL)."""

from __future__ import annotations

import random
import time

import dns.rcode
import pytest

from dnsmasq import ScriptedDnsServer, silent_udp_port, zone
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp.mx_lookup import (
    MxHost,
    MxLookup,
    MxLookupError,
    MxTarget,
    NoMxHostsError,
    NullMxError,
    lookup_mx,
)
from slimta.util.dns import DnsCache, Resolver

RECORDS = [
    # example.test: three preferences, a host with IPv4 and IPv6
    "--mx-host=example.test,mx3.example.test,30",
    "--mx-host=example.test,mx1.example.test,10",
    "--mx-host=example.test,mx2.example.test,20",
    "--host-record=mx1.example.test,127.0.0.2,::2",
    "--host-record=mx2.example.test,127.0.0.3",
    "--host-record=mx3.example.test,127.0.0.4",
    # equal.test: three hosts at 10, one backup at 20
    "--mx-host=equal.test,a.equal.test,10",
    "--mx-host=equal.test,b.equal.test,10",
    "--mx-host=equal.test,c.equal.test,10",
    "--mx-host=equal.test,backup.equal.test,20",
    "--host-record=a.equal.test,127.0.1.1",
    "--host-record=b.equal.test,127.0.1.2",
    "--host-record=c.equal.test,127.0.1.3",
    "--host-record=backup.equal.test,127.0.1.4",
    # implicit.test: no MX, an A and an AAAA record
    "--host-record=implicit.test,127.0.0.5,::5",
    # null.test: RFC 7505
    "--mx-host=null.test,.,0",
    # txtonly.test exists, but has neither MX nor address
    "--txt-record=txtonly.test,hello",
    # nowhere.test: its MX hosts have no address
    "--mx-host=nowhere.test,gone.nowhere.test,10",
    # half.test: the first MX has no address, the second has
    "--mx-host=half.test,gone.half.test,10",
    "--mx-host=half.test,mx.half.test,20",
    "--host-record=mx.half.test,127.0.0.6",
    # shared.test: two MX names for one address
    "--mx-host=shared.test,one.shared.test,10",
    "--mx-host=shared.test,two.shared.test,20",
    "--host-record=one.shared.test,127.0.0.7",
    "--host-record=two.shared.test,127.0.0.7",
]


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(dnsmasq):
    return dnsmasq(["--local-ttl=300", *RECORDS])


@pytest.fixture
def resolver(server):
    return server.resolver(timeout=0.2, lifetime=0.5)


def addresses(targets):
    return [t.address for t in targets]


async def test_mx_hosts_by_preference(resolver):
    targets = await MxLookup(resolver).targets("example.test")
    assert targets == [
        MxTarget("mx1.example.test", "127.0.0.2", 25, 10),
        MxTarget("mx1.example.test", "::2", 25, 10),
        MxTarget("mx2.example.test", "127.0.0.3", 25, 20),
        MxTarget("mx3.example.test", "127.0.0.4", 25, 30),
    ]


async def test_hosts_before_resolution(resolver):
    hosts = await MxLookup(resolver, port=2525).hosts("Example.Test.")
    assert hosts == [
        MxHost("mx1.example.test", 10, 2525),
        MxHost("mx2.example.test", 20, 2525),
        MxHost("mx3.example.test", 30, 2525),
    ]


async def test_port_and_address_families(resolver):
    targets = await MxLookup(resolver, port=2525, ip_versions=(6, 4)).targets("example.test")
    assert [(t.address, t.port) for t in targets][:2] == [("::2", 2525), ("127.0.0.2", 2525)]
    targets = await MxLookup(resolver, ip_versions=(4,)).targets("example.test")
    assert addresses(targets) == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with pytest.raises(ValueError):
        MxLookup(resolver, ip_versions=(5,))


async def test_equal_preferences_in_random_order(resolver):
    orders = set()
    for seed in range(40):
        targets = await MxLookup(resolver, rng=random.Random(seed)).targets("equal.test")
        names = [t.name for t in targets]
        assert sorted(names[:3]) == ["a.equal.test", "b.equal.test", "c.equal.test"]
        assert names[3] == "backup.equal.test"
        orders.add(tuple(names))
        # the same seed gives the same order
        again = await MxLookup(resolver, rng=random.Random(seed)).targets("equal.test")
        assert [t.name for t in again] == names
    assert len(orders) == 6  # every permutation of the three turns up


async def test_implicit_mx(resolver):
    targets = await MxLookup(resolver).targets("implicit.test")
    assert targets == [
        MxTarget("implicit.test", "127.0.0.5", 25, 0),
        MxTarget("implicit.test", "::5", 25, 0),
    ]


async def test_null_mx(resolver):
    with pytest.raises(NullMxError) as info:
        await MxLookup(resolver).targets("null.test")
    error = info.value
    assert isinstance(error, PermanentRelayError)
    assert error.reply.code == "556"
    assert error.reply.enhanced_status_code == "5.1.10"
    assert "null MX" in error.reply.message
    assert error.domain == "null.test"


async def test_null_mx_among_other_records_is_ignored():
    records = {("mixed.test", "MX"): ["0 .", "10 mx.mixed.test."],
               ("mx.mixed.test", "A"): ["127.0.0.8"]}
    with ScriptedDnsServer(zone(records)) as scripted:
        r = Resolver([scripted.nameserver], timeout=0.2, lifetime=0.5)
        targets = await MxLookup(r).targets("mixed.test")
        assert targets == [MxTarget("mx.mixed.test", "127.0.0.8", 25, 10)]


@pytest.mark.parametrize(
    ("domain", "detail"),
    [
        ("missing.test", "domain does not exist"),
        ("txtonly.test", "no MX, A or AAAA record"),
        ("nowhere.test", "no address for MX host gone.nowhere.test"),
    ],
)
async def test_no_usable_records(resolver, domain, detail):
    with pytest.raises(NoMxHostsError) as info:
        await MxLookup(resolver).targets(domain)
    error = info.value
    assert isinstance(error, PermanentRelayError)
    assert error.reply.code == "550"
    assert error.reply.enhanced_status_code == "5.1.2"
    assert detail in error.reply.message
    assert domain in error.reply.message


async def test_mx_host_without_address_is_skipped(resolver):
    targets = await MxLookup(resolver).targets("half.test")
    assert targets == [MxTarget("mx.half.test", "127.0.0.6", 25, 20)]


async def test_an_address_is_tried_once(resolver):
    targets = await MxLookup(resolver).targets("shared.test")
    assert targets == [MxTarget("one.shared.test", "127.0.0.7", 25, 10)]


async def test_max_hosts(resolver):
    targets = await MxLookup(resolver, max_hosts=2).targets("example.test")
    assert [t.name for t in targets] == ["mx1.example.test"] * 2 + ["mx2.example.test"]


async def test_nameserver_that_does_not_answer():
    with silent_udp_port() as port:
        r = Resolver([f"127.0.0.1:{port}"], timeout=0.1, lifetime=0.3)
        started = time.monotonic()
        with pytest.raises(MxLookupError) as info:
            await MxLookup(r).targets("example.test")
        assert time.monotonic() - started < 2
    error = info.value
    assert isinstance(error, TransientRelayError)
    assert error.reply.code == "451"
    assert error.reply.enhanced_status_code == "4.4.3"
    assert "example.test" in error.reply.message


async def test_dns_failure_on_some_hosts_keeps_the_others():
    records = {
        ("flaky.test", "MX"): ["10 bad.flaky.test.", "20 good.flaky.test."],
        ("good.flaky.test", "A"): ["127.0.0.9"],
    }
    rcodes = {"bad.flaky.test": dns.rcode.SERVFAIL}
    with ScriptedDnsServer(zone(records, rcodes=rcodes)) as scripted:
        r = Resolver([scripted.nameserver], cache=False, timeout=0.2, lifetime=0.5)
        targets = await MxLookup(r).targets("flaky.test")
        assert targets == [MxTarget("good.flaky.test", "127.0.0.9", 25, 20)]
        # every host failing is a transient failure, not "no hosts"
        rcodes["good.flaky.test"] = dns.rcode.SERVFAIL
        with pytest.raises(MxLookupError, match="SERVFAIL"):
            await MxLookup(r).targets("flaky.test")
        # and so is SERVFAIL on the MX query itself
        rcodes["flaky.test"] = dns.rcode.SERVFAIL
        with pytest.raises(MxLookupError):
            await MxLookup(r).targets("flaky.test")


async def test_lookups_are_cached_up_to_their_ttl(server):
    clock = FakeClock()
    r = server.resolver(cache=DnsCache(clock=clock), timeout=0.2, lifetime=0.5)
    lookup = MxLookup(r)
    first = await lookup.targets("example.test")
    server.stop()
    clock.now += 299
    assert await lookup.targets("example.test") == first  # no server: all from the cache
    clock.now += 1
    with pytest.raises(MxLookupError):
        await lookup.targets("example.test")


async def test_force_mx(resolver):
    lookup = MxLookup(
        resolver,
        force_mx={"Forced.test": "127.0.0.9:2525", "byname.test": "mx2.example.test"},
    )
    assert await lookup.targets("forced.TEST") == [MxTarget("127.0.0.9", "127.0.0.9", 2525, 0)]
    assert await lookup.targets("byname.test") == [
        MxTarget("mx2.example.test", "127.0.0.3", 25, 0)
    ]
    lookup.force_mx("null.test", "[::1]:26")  # forced routing wins over DNS, even a null MX
    assert await lookup.targets("null.test") == [MxTarget("::1", "::1", 26, 0)]
    # other domains still get their MX lookup
    assert addresses(await lookup.targets("implicit.test")) == ["127.0.0.5", "::5"]


async def test_force_mx_needs_no_dns():
    with silent_udp_port() as port:
        r = Resolver([f"127.0.0.1:{port}"], timeout=0.1, lifetime=0.2)
        lookup = MxLookup(r, force_mx={"forced.test": "127.0.0.9"})
        assert addresses(await lookup.targets("forced.test")) == ["127.0.0.9"]


async def test_force_mx_to_an_unknown_host_is_transient(resolver):
    lookup = MxLookup(resolver, force_mx={"forced.test": "typo.example.test"})
    with pytest.raises(MxLookupError, match=r"forced destination typo\.example\.test"):
        await lookup.targets("forced.test")


async def test_override_mx(resolver):
    lookup = MxLookup(
        resolver,
        override_mx={"MX2.example.test.": "127.0.0.20:2526", "implicit.test": "mx3.example.test"},
    )
    targets = await lookup.targets("example.test")
    assert targets[2] == MxTarget("127.0.0.20", "127.0.0.20", 2526, 20)
    assert [t.name for t in targets] == [
        "mx1.example.test", "mx1.example.test", "127.0.0.20", "mx3.example.test",
    ]
    # the implicit MX is overridden by its name, the domain
    assert await lookup.targets("implicit.test") == [
        MxTarget("mx3.example.test", "127.0.0.4", 25, 0)
    ]


async def test_domain_literals():
    with silent_udp_port() as port:
        r = Resolver([f"127.0.0.1:{port}"], timeout=0.1, lifetime=0.2)
        lookup = MxLookup(r, port=2525)
        assert await lookup.targets("[127.0.0.3]") == [
            MxTarget("127.0.0.3", "127.0.0.3", 2525, 0)
        ]
        assert addresses(await lookup.targets("[IPv6:::1]")) == ["::1"]
        # not literals: looked up as names, and the silent server makes that fail
        for bad in ["[::1]", "[IPv6:127.0.0.1]"]:
            with pytest.raises((NoMxHostsError, MxLookupError)):
                await lookup.targets(bad)


async def test_shared_resolver_and_lookup_mx(server):
    server.install(timeout=0.2, lifetime=0.5)
    targets = await lookup_mx("equal.test", port=26, rng=random.Random(1))
    assert [t.port for t in targets] == [26] * 4
    assert targets[-1].name == "backup.equal.test"
    assert addresses(await MxLookup().targets("implicit.test")) == ["127.0.0.5", "::5"]


async def test_empty_domain(resolver):
    for domain in ["", "."]:
        with pytest.raises(NoMxHostsError, match="empty domain"):
            await MxLookup(resolver).targets(domain)
